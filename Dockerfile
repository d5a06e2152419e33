# One image for every tailgate process: `tailgate gateway`, `tailgate worker`, `tailgate mock-upstream`.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY tailgate ./tailgate
COPY gateway ./gateway
COPY worker ./worker
RUN pip install . && useradd --system --uid 10001 --no-create-home tailgate

USER 10001
ENV TAILGATE_LOG_FORMAT=json
EXPOSE 8000
ENTRYPOINT ["tailgate"]
CMD ["gateway", "--host", "0.0.0.0", "--port", "8000"]

"""The ARQ worker: the job, the upstream client, the publisher."""

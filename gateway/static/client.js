// tailgate's browser client: follow a stream with EventSource, resume by itself, and prove with
// `seq` that nothing was lost or repeated. No dependencies; the gateway serves it at /v1/client.js.
//
//   import { start } from "https://gateway.example/v1/client.js";
//
//   // Your backend holds the API key: it POSTs /v1/streams and answers the gateway's JSON.
//   const stream = await start("/api/streams", { prompt: "Tell me about rivers" }, {
//     onText: (text) => (output.textContent = text),
//   });
//   const { text } = await stream.finished; // rejects with a TailgateError
//
// `follow(created)` attaches to a stream the page already knows ({id, read_token}).
//
// Deliberate oddities:
// - EventSource cannot send headers, so it reads with `?token=<read_token>`. It resumes by itself
//   on a network error (sending Last-Event-ID, after the server's `retry:` hint); when it gives up
//   instead (any answer but 200: a 502 from a load balancer, say), this module asks the same URL
//   once with fetch to learn why, and reopens with `?last_event_id=` unless the answer is final.
// - EventSource dispatches an event by its name only, so the names are listed here. An event
//   with a type this module does not know would show up as a gap in `seq`, never silently.
// - A server-sent `error` event and EventSource's own connection `error` share a name: the first
//   is a MessageEvent, the second is not.

const EVENT_TYPES = ["queued", "started", "delta", "reset", "done", "error", "cancelled"];
const TERMINAL = new Set(["done", "error", "cancelled"]);
const BACKOFF_FIRST_MS = 500; // when this module reconnects itself: full jitter, doubling, capped
const BACKOFF_MAX_MS = 10_000;

/** Why a stream could not be followed, or why it failed (`code` is the server's where it sent one). */
export class TailgateError extends Error {
  constructor(code, message, { status = null, event = null } = {}) {
    super(message);
    this.name = "TailgateError";
    this.code = code;
    this.status = status; // the HTTP status, when one said so
    this.event = event; // the terminal `error` event, when the stream ended with one
  }
}

/**
 * Create a stream through your backend, then follow it. `create` is the URL of a backend route
 * that takes `body` as JSON and answers the gateway's create answer ({id, read_token, ...}), or an
 * async function `(body) => answer`. `options` are follow()'s.
 */
export async function start(create, body, options = {}) {
  let created;
  if (typeof create === "function") {
    created = await create(body);
  } else {
    const response = await fetch(create, {
      method: "POST",
      headers: { "Content-Type": "application/json", ...options.headers },
      body: JSON.stringify(body),
    });
    const answer = await response.json().catch(() => null);
    if (!response.ok) throw httpError(response.status, answer, "creating the stream");
    created = answer;
  }
  return follow(created, options);
}

/**
 * Follow the stream `created` ({id, read_token, events_url?}: what POST /v1/streams answers).
 *
 * options:
 *   base         the gateway's URL (default: where this module was loaded from)
 *   lastEventId  resume after this event id instead of reading from the start
 *   giveUpMs     fail with `unreachable` after this long without a connection (default 120000)
 *   onEvent(event)              every event, once, in order: {id, type, seq, data}
 *   onText(text, event)         the text so far, after every delta and reset
 *   onReset(event)              the text so far is void; a new attempt follows
 *   onDisconnect({lastEventId, cause})   the connection was lost ("network", "refused", "dropped")
 *   onReconnect({count, downMs, attempts, lastEventId})   reading again after a loss
 *   onEnd(event)                the terminal event: done, error or cancelled
 *   onError(error)              a TailgateError: the stream failed, or could not be followed
 *   onStatus(status)            connecting, open, reconnecting, done, error, cancelled, failed, closed
 */
export function follow(created, options = {}) {
  return new TailgateStream(created, options);
}

export class TailgateStream {
  #options;
  #url;
  #es = null;
  #ended = false;
  #lostAt = null;
  #attempts = 0;
  #giveUp = null;
  #resolve;
  #reject;

  constructor(created, options = {}) {
    if (!created || !created.id || !created.read_token) {
      throw new TypeError("follow() needs the create answer: {id, read_token}");
    }
    this.#options = options;
    this.id = created.id;
    this.text = "";
    this.seq = 0; // the last seq accepted: every event from 1 to here arrived, once each
    this.lastEventId = options.lastEventId ?? null;
    this.reconnects = 0;
    this.duplicates = 0; // events dropped because their seq had already arrived
    this.status = "connecting";
    this.event = null; // the terminal event, once it arrived
    const path = created.events_url ?? `/v1/streams/${encodeURIComponent(created.id)}/events`;
    this.#url = new URL(path, options.base ?? import.meta.url);
    this.#url.searchParams.set("token", created.read_token);
    this.finished = new Promise((resolve, reject) => {
      this.#resolve = resolve;
      this.#reject = reject;
    });
    this.finished.catch(() => {}); // a caller that only listens through handlers has seen it
    this.#open();
  }

  /** Stop following (the stream goes on on the server). `finished` resolves with the text so far. */
  close() {
    if (this.#ended) return;
    this.#finish("closed");
    this.#resolve({ text: this.text, event: null });
  }

  /** Cut the connection now, as a network failure would; the stream resumes from its last event. */
  drop() {
    if (this.#ended || !this.#es) return;
    this.#es.close();
    this.#es = null;
    this.#lost("dropped");
    this.#open();
  }

  #open() {
    const url = new URL(this.#url);
    if (this.lastEventId) url.searchParams.set("last_event_id", this.lastEventId);
    const es = new EventSource(url);
    this.#es = es;
    es.addEventListener("open", () => es === this.#es && this.#opened());
    for (const type of [...EVENT_TYPES, "message"]) {
      es.addEventListener(type, (e) => e instanceof MessageEvent && es === this.#es && this.#message(e));
    }
    es.addEventListener("error", (e) => !(e instanceof MessageEvent) && es === this.#es && this.#failed(es));
  }

  #opened() {
    if (this.#lostAt !== null) {
      this.reconnects += 1;
      const info = {
        count: this.reconnects,
        downMs: Date.now() - this.#lostAt,
        attempts: this.#attempts,
        lastEventId: this.lastEventId,
      };
      this.#lostAt = null;
      this.#attempts = 0;
      clearTimeout(this.#giveUp);
      this.#emit("onReconnect", info);
    }
    this.#setStatus("open");
  }

  #message(e) {
    let data;
    try {
      data = JSON.parse(e.data);
    } catch {
      return this.#fail(new TailgateError("protocol", `event ${e.type} carries no JSON: ${e.data.slice(0, 80)}`));
    }
    const seq = data && data.seq;
    if (!Number.isInteger(seq) || e.type === "message") {
      return this.#fail(new TailgateError("protocol", `not a tailgate event: ${e.type} ${e.data.slice(0, 80)}`));
    }
    const event = { id: e.lastEventId, type: e.type, seq, data };
    if (e.type === "reset" && seq === 0) {
      // The cursor was out of the stream's range: the whole stream follows, from seq 1.
      this.seq = 0;
    } else if (seq <= this.seq) {
      this.duplicates += 1;
      return;
    } else if (seq !== this.seq + 1) {
      const missing = seq === this.seq + 2 ? `${this.seq + 1} is` : `${this.seq + 1} to ${seq - 1} are`;
      return this.#fail(new TailgateError("gap", `seq ${seq} arrived after ${this.seq}: ${missing} missing`));
    } else {
      this.seq = seq;
    }
    this.lastEventId = e.lastEventId || this.lastEventId;
    this.#emit("onEvent", event);
    if (e.type === "delta") {
      this.text += data.text;
      this.#emit("onText", this.text, event);
    } else if (e.type === "reset") {
      this.text = "";
      this.#emit("onReset", event);
      this.#emit("onText", this.text, event);
    } else if (TERMINAL.has(e.type)) {
      this.event = event;
      this.#finish(e.type);
      this.#emit("onEnd", event);
      if (e.type === "error") {
        const error = new TailgateError(data.code ?? "error", data.message ?? "the stream failed", { event });
        this.#emit("onError", error);
        this.#reject(error);
      } else {
        this.#resolve({ text: this.text, event });
      }
    }
  }

  #failed(es) {
    if (this.#ended) return;
    this.#lost(this.status === "open" ? "network" : "refused");
    this.#attempts += 1;
    if (es.readyState !== EventSource.CLOSED) return; // the browser retries by itself
    this.#es = null;
    this.#recover(es.url);
  }

  #lost(cause) {
    this.#setStatus("reconnecting");
    if (this.#lostAt !== null) return;
    this.#lostAt = Date.now();
    const giveUpMs = this.#options.giveUpMs ?? 120_000;
    this.#giveUp = setTimeout(() => {
      const seconds = Math.round(giveUpMs / 1000);
      this.#fail(new TailgateError("unreachable", `no connection to the gateway for ${seconds} s`));
    }, giveUpMs);
    this.#emit("onDisconnect", { lastEventId: this.lastEventId, cause });
  }

  // EventSource gave up (an answer other than 200): ask why, then reopen or fail.
  async #recover(url) {
    for (let failures = 0; !this.#ended; failures += 1) {
      const ceiling = Math.min(BACKOFF_MAX_MS, BACKOFF_FIRST_MS * 2 ** failures);
      await new Promise((resolve) => setTimeout(resolve, Math.random() * ceiling));
      if (this.#ended) return;
      let status;
      let answer = null;
      const probe = new AbortController();
      try {
        const response = await fetch(url, { signal: probe.signal, cache: "no-store" });
        status = response.status;
        if (status !== 200) answer = await response.json().catch(() => null);
      } catch {
        continue; // unreachable: try again
      } finally {
        probe.abort(); // a 200 is a live event stream: the EventSource reads it, not this request
      }
      if (this.#ended) return;
      if (status === 200) return this.#open();
      if (status === 429 || status >= 500) continue;
      if (status === 204) {
        const message = "the gateway says the stream is over, but no terminal event arrived";
        return this.#fail(new TailgateError("protocol", message));
      }
      return this.#fail(httpError(status, answer, "reading the stream"));
    }
  }

  #fail(error) {
    if (this.#ended) return;
    this.#finish("failed");
    this.#emit("onError", error);
    this.#reject(error);
  }

  #finish(status) {
    this.#ended = true;
    clearTimeout(this.#giveUp);
    if (this.#es) this.#es.close(); // no reconnect; the gateway would answer 204 anyway
    this.#es = null;
    this.#setStatus(status);
  }

  #setStatus(status) {
    if (this.status === status) return;
    this.status = status;
    this.#emit("onStatus", status);
  }

  #emit(name, ...args) {
    const handler = this.#options[name];
    if (!handler) return;
    try {
      handler.apply(this, args);
    } catch (error) {
      queueMicrotask(() => {
        throw error; // the page's bug, reported as such; the stream goes on
      });
    }
  }
}

function httpError(status, answer, doing) {
  const detail = answer && answer.error;
  return new TailgateError(
    (detail && detail.code) || `http_${status}`,
    (detail && detail.message) || `${doing}: the server answered ${status}`,
    { status },
  );
}

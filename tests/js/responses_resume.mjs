// The Responses API in background mode through tailgate, by the openai package, unmodified: start a
// streamed response, drop the connection after some deltas, resume after the last sequence_number.
// Usage: node responses_resume.mjs <gateway url> <api key> <prompt> <deltas before the drop>
// Prints one JSON line: every event the application saw, and the response retrieved at the end.
import OpenAI from "openai";

const [gateway, apiKey, prompt, dropAfter] = process.argv.slice(2);
const client = new OpenAI({ baseURL: `${gateway}/v1`, apiKey, maxRetries: 0 });

const events = [];
let responseId = null;
let deltas = 0;
const first = await client.responses.create({
  model: "gpt-4o-mini",
  input: prompt,
  background: true,
  stream: true,
});
for await (const event of first) {
  events.push(event);
  responseId ??= event.response?.id ?? null;
  if (event.type === "response.output_text.delta" && ++deltas === Number(dropAfter)) {
    break; // leaving the loop closes the connection
  }
}

const startingAfter = events.at(-1).sequence_number;
const rest = await client.responses.retrieve(responseId, { stream: true, starting_after: startingAfter });
for await (const event of rest) {
  events.push(event);
}

const response = await client.responses.retrieve(responseId);
console.log(
  JSON.stringify({
    responseId,
    startingAfter,
    sequenceNumbers: events.map((e) => e.sequence_number),
    types: events.map((e) => e.type),
    text: events
      .filter((e) => e.type === "response.output_text.delta")
      .map((e) => e.delta)
      .join(""),
    status: response.status,
    outputText: response.output_text,
  }),
);

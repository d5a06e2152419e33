// Chat Completions, streamed through tailgate by the openai package, unmodified.
// Usage: node chat_stream.mjs <gateway url> <api key> <prompt>
// Prints one JSON line: what the application saw.
import OpenAI from "openai";

const [gateway, apiKey, prompt] = process.argv.slice(2);
const client = new OpenAI({ baseURL: `${gateway}/v1`, apiKey, maxRetries: 0 });

const { data: stream, response } = await client.chat.completions
  .create({
    model: "gpt-4o-mini",
    messages: [{ role: "user", content: prompt }],
    stream: true,
    stream_options: { include_usage: true },
  })
  .withResponse();

let text = "";
let role = null;
let finishReason = null;
let usage = null;
for await (const chunk of stream) {
  const choice = chunk.choices[0];
  role ??= choice?.delta?.role ?? null;
  text += choice?.delta?.content ?? "";
  finishReason = choice?.finish_reason ?? finishReason;
  usage = chunk.usage ?? usage;
}
const streamId = response.headers.get("x-tailgate-stream-id");
console.log(JSON.stringify({ streamId, role, text, finishReason, usage }));

// Runs tests/tutorial_client.js unchanged under Node: the two DOM elements it looks up, and a fetch
// that sends its hard-coded http://localhost:8000 to the gateway under test.
// Usage: node run_tutorial_client.js <gateway base url> <prompt>
const fs = require('fs');
const vm = require('vm');

const [, , target, prompt] = process.argv;
const realFetch = globalThis.fetch;
globalThis.fetch = (url, init) => realFetch(url.replace('http://localhost:8000', target), init);

let submit;
const elements = {
  queryForm: { addEventListener: (type, handler) => { if (type === 'submit') submit = handler; } },
  promptInput: { value: prompt },
};
globalThis.document = { getElementById: (id) => elements[id] };

vm.runInThisContext(fs.readFileSync(`${__dirname}/tutorial_client.js`, 'utf8'));
submit({ preventDefault() {} });

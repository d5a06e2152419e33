// The original tutorial's client, verbatim (shared/seeds/000_af1b598e8f100d1e.txt). Do not edit:
// tests/test_compat.py proves tailgate's /ask_query works with it unchanged.
document.getElementById('queryForm').addEventListener('submit', function(event) {
    event.preventDefault();
    
    const prompt = document.getElementById('promptInput').value;

    fetch('http://localhost:8000/ask_query', {
        method: 'POST',
        headers: {
            'Content-Type': 'application/json',
            'Accept': 'text/event-stream'  // 이 헤더가 SSE를 위한 응답을 수신하기 위해 필요합니다.
        },
        body: JSON.stringify({ prompt: prompt })
    })
    .then(response => {
        if (!response.ok) {
            throw new Error('Network response was not ok');
        }
        const reader = response.body.getReader();
        const decoder = new TextDecoder('utf-8');

        function read() {
            reader.read().then(({ done, value }) => {
                if (done) {
                    return;
                }

                const chunk = decoder.decode(value, { stream: true });
                const lines = chunk.split('\n');
                lines.forEach(line => {
                    if (line.trim()) {
                        const parsedLine = JSON.parse(line);
                        const status = parsedLine.status;
                        const data = parsedLine.data;
                        
                        console.log(`[${status}] ${data}`);
                    }
                });
                
                read();
            });
        }

        read();
    })
    .catch(error => {
        console.error('Fetch error:', error);
    });
});

"""What generates replies: the contract every backend keeps (contract), and a client of an OpenAI-compatible
server such as vLLM (openai). The local engine lives in voxtral_app.model."""

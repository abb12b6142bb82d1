"""Serving: the FastAPI app (app), the fastrtc handler for WebRTC, WebSocket and phone (handler), the page (ui,
chat_view), the session API (session_api), OpenAI-compatible routes (openai_routes), metrics, and the guards
(guard, access, sockets, ice, errors)."""

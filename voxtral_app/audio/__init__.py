"""Audio in: PCM and resampling (pcm), noise suppression and gain (denoise), voice activity (vad)."""

"""Model-side code: the Engine protocol, its vLLM and fake implementations, the model replica."""

"""easy-VQA LLaVA-style VLM made reproducibly here (see README: easy-VQA VLM)."""

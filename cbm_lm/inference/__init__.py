"""Generation (diffusion and autoregressive samplers), traces, chunks, steering."""

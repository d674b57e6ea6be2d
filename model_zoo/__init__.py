"""Float S2DiT: text encoder, Sandwich DiT (LCHA + SSA), efficient decoder, streaming sampler, registry."""

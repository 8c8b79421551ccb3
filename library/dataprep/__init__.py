"""Dataset preparation: metadata JSON, caption/tag files, tag clean-up, WD14 tagging, BLIP captions, image resizing
and bucketed latent pre-caching. The entry scripts live in `finetune/` and `tools/`; their logic lives here."""

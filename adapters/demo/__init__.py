"""The committed demo adapters and `recipe`, which trains them."""

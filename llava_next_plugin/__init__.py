"""llava-next-plugin."""

"""``tdw-emu soak``: many emulated devices for a long time, and a verdict on what was lost."""

"""``flywheel demo``: the main job on embedded defaults, with real prompts and simulated users."""

"""Voice presets (files in voices/) and the custom-voice store; imports core only."""

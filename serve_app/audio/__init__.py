"""ffmpeg's side of the formats and the encoder deployment; imports core only."""

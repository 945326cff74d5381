"""Generated protobuf modules (built from proto/, never edited)."""

"""The demo model family "shapes": its domain, its training recipes and its shipped models."""

"""Training engine for the preference-loss zoo."""

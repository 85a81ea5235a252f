"""Where runs execute: the Ray instance (local or a cluster's) and what every Ray Train run shares."""

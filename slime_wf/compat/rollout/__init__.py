"""`slime.rollout`: generation, rewards, filters and the data source, as slime's plugins import them."""

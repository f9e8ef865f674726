"""The rollout side: data source and buffer, reward models, filters, engines and the rollout loop."""

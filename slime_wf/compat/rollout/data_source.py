"""`slime.rollout.data_source`: the default buffer filter and the data source, as slime names them."""

from slime_wf.rollout.data_source import RolloutDataSourceWithBuffer, pop_first

RolloutDataSource = RolloutDataSourceWithBuffer

__all__ = ["RolloutDataSource", "RolloutDataSourceWithBuffer", "pop_first"]

import json

import pytest
import yaml
from pydantic import ValidationError

from slime_wf.config import (
    SECTIONS,
    CampaignConfig,
    ConfigError,
    ObjectiveConfigError,
    ObjectiveFields,
    ObjectiveOptions,
    RolloutConfig,
    TrainConfig,
    leaf_sections,
)


def write(tmp_path, data):
    path = tmp_path / "campaign.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_from_yaml_with_sections_and_overrides(tmp_path):
    path = write(
        tmp_path, {"campaign": "exp1", "rollout": {"rollout_batch_size": 4, "n_samples_per_prompt": 8}}
    )
    cfg = CampaignConfig.from_yaml(
        path, ["num_rollout=3", "reward.rm_type=dapo", "reward_key=score", "campaign=exp2"]
    )
    assert cfg.campaign == "exp2"
    assert cfg.rollout.rollout_batch_size == 4 and cfg.rollout.n_samples_per_prompt == 8
    assert cfg.rollout.num_rollout == 3
    assert cfg.reward.rm_type == "dapo" and cfg.reward.reward_key == "score"


def test_overrides_parse_yaml_scalars(tmp_path):
    cfg = CampaignConfig.from_dict(
        {}, ["partial_rollout=true", "rollout_max_prompt_len=null", "rm_timeout=2.5"]
    )
    assert cfg.rollout.partial_rollout is True
    assert cfg.data.rollout_max_prompt_len is None
    assert cfg.reward.rm_timeout == 2.5


def test_override_does_not_mutate_input():
    data = {"rollout": {"rollout_batch_size": 4}}
    CampaignConfig.from_dict(data, ["rollout_batch_size=16"])
    assert data == {"rollout": {"rollout_batch_size": 4}}


def test_args_expose_every_leaf_flat():
    cfg = CampaignConfig.from_dict(
        {"rollout": {"n_samples_per_prompt": 4}, "reward": {"reward_key": "score"}}
    )
    args = cfg.args()
    assert args.n_samples_per_prompt == 4 and args.reward_key == "score" and args.campaign == "default"
    for leaf in leaf_sections():
        assert hasattr(args, leaf), leaf


def test_leaf_names_are_unique_across_sections():
    seen = {}
    for section, model in SECTIONS.items():
        for leaf in model.model_fields:
            assert leaf not in seen, f"{leaf} is in both {seen[leaf]} and {section}"
            seen[leaf] = section


@pytest.mark.parametrize(
    "data, expected",
    [
        ({"rollout": {"rollout_batchsize": 3}}, "did you mean 'rollout.rollout_batch_size'"),
        ({"rollout_batch_size": 3}, "did you mean 'rollout.rollout_batch_size'"),
        ({"rewards": {}}, "did you mean 'reward'"),
        ({"reward": {"rm_tpye": "math"}}, "did you mean 'reward.rm_type'"),
    ],
)
def test_unknown_key_names_it_and_suggests(data, expected):
    with pytest.raises(ConfigError, match=expected):
        CampaignConfig.from_dict(data)


def test_unknown_override_key_suggests():
    with pytest.raises(ConfigError, match="unknown key 'n_sample_per_prompt'.*rollout.n_samples_per_prompt"):
        CampaignConfig.from_dict({}, ["n_sample_per_prompt=4"])
    with pytest.raises(ConfigError, match="key=value"):
        CampaignConfig.from_dict({}, ["n_samples_per_prompt"])


@pytest.mark.parametrize(
    "data, expected",
    [
        (
            {"rollout": {"rollout_batch_size": 0}},
            r"rollout.rollout_batch_size = 0: Input should be greater than 0",
        ),
        (
            {"rollout": {"rollout_batch_size": "many"}},
            r"rollout.rollout_batch_size = 'many': Input should be a valid integer",
        ),
        ({"reward": {"rm_type": "deepscalar"}}, r"reward.rm_type = 'deepscalar'.*did you mean 'deepscaler'"),
        (
            {"reward": {"rm_on_error": "ignore"}},
            r"reward.rm_on_error = 'ignore'.*'raise' or 'failure_reward'",
        ),
        ({"campaign": "Bad Name"}, r"campaign = 'Bad Name'"),
        (
            {"rollout": {"rollout_batch_size": 8, "over_sampling_batch_size": 4}},
            r"over_sampling_batch_size=4 is smaller",
        ),
        ({"reward": {"rm_type": "remote_rm"}}, r"needs reward.rm_url"),
        ({"data": 3}, r"section 'data' must be a mapping"),
        # the reward that replaces a NaN reward must not be NaN itself
        (
            {"reward": {"rm_failure_reward": float("nan")}},
            r"reward.rm_failure_reward = nan: Input should be a finite",
        ),
    ],
)
def test_bad_values_name_field_value_and_allowed(data, expected):
    with pytest.raises(ConfigError, match=expected):
        CampaignConfig.from_dict(data)


def test_boxed_rm_types_are_accepted():
    assert CampaignConfig.from_dict({"reward": {"rm_type": "boxed_math"}}).reward.rm_type == "boxed_math"
    with pytest.raises(ConfigError):
        CampaignConfig.from_dict({"reward": {"rm_type": "boxed_remote_rm"}})


def test_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("rollout: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml is not valid YAML"):
        CampaignConfig.from_yaml(str(bad))
    with pytest.raises(ConfigError, match="does not exist"):
        CampaignConfig.from_yaml(str(tmp_path / "missing.yaml"))
    path = write(tmp_path, {"rollout": {"nope": 1}})
    with pytest.raises(ConfigError, match=r"campaign.yaml: unknown key 'rollout.nope'"):
        CampaignConfig.from_yaml(path)


def test_round_trip_through_yaml_and_stable_hash(tmp_path):
    cfg = CampaignConfig.from_dict(
        {
            "rollout": {"n_samples_per_prompt": 4},
            "data": {"apply_chat_template_kwargs": {"enable_thinking": False}},
        }
    )
    again = CampaignConfig.from_yaml(write(tmp_path, yaml.safe_load(cfg.to_yaml())))
    assert again == cfg and again.config_hash() == cfg.config_hash()
    assert CampaignConfig.from_dict({}, ["n_samples_per_prompt=5"]).config_hash() != cfg.config_hash()


def test_json_schema_drives_a_form():
    schema = CampaignConfig.model_json_schema()
    json.dumps(schema)  # plain JSON
    assert set(schema["properties"]) == {"campaign", *SECTIONS}
    for name, model in SECTIONS.items():
        props = schema["$defs"][model.__name__]["properties"]
        for leaf, prop in props.items():
            assert prop.get("description"), f"{name}.{leaf} has no description"
            assert "default" in prop, f"{name}.{leaf} has no default"
    assert schema["$defs"]["RewardConfig"]["properties"]["rm_on_error"]["enum"] == ["raise", "failure_reward"]


def test_validate_assignment():
    cfg = CampaignConfig()
    with pytest.raises(ValidationError):
        cfg.rollout.rollout_batch_size = -2


def test_the_objective_options_are_the_train_sections_fields():
    objective = set(ObjectiveFields.model_fields)
    assert objective <= set(TrainConfig.model_fields) and "advantage_estimator" in objective
    assert set(ObjectiveOptions.model_fields) == objective | {"rollout_temperature"}
    for name in objective:
        assert repr(TrainConfig.model_fields[name]) == repr(ObjectiveOptions.model_fields[name]), name
    assert repr(RolloutConfig.model_fields["rollout_temperature"]) == repr(
        ObjectiveOptions.model_fields["rollout_temperature"]
    )
    # a campaign's flat args resolve into the options with the campaign's values
    cfg = CampaignConfig.from_dict(
        {
            "train": {"advantage_estimator": "gspo", "eps_clip": 0.3, "use_tis": True},
            "rollout": {"rollout_temperature": 0.7},
        }
    )
    options = ObjectiveOptions.from_args(cfg.args())
    assert (
        options.advantage_estimator,
        options.eps_clip,
        options.eps_clip_high,
        options.use_tis,
        options.rollout_temperature,
    ) == ("gspo", 0.3, 0.3, True, 0.7)
    assert options.model_dump(exclude={"eps_clip_high", "rollout_temperature"}) == cfg.train.model_dump(
        include=objective - {"eps_clip_high"}
    )


@pytest.mark.parametrize(
    ("section", "settings", "problem"),
    [
        ("train", {"eps_clip_c": 0.9}, "eps_clip_c = 0.9: Input should be greater than 1"),
        ("train", {"kl_loss_type": "k5"}, "kl_loss_type = 'k5': Input should be 'k1', 'k2', 'k3' or"),
        ("train", {"gamma": 1.5}, "gamma = 1.5: Input should be less than or equal to 1"),
        (
            "train",
            {"advantage_estimator": "reinforce_plus_plus"},
            "advantage_estimator=reinforce_plus_plus requires normalize_advantages: true",
        ),
        ("train", {"loss_type": "custom_loss"}, "loss_type=custom_loss needs custom_loss_function_path"),
        ("train", {"tis_clip_low": 3.0}, "tis_clip_low=3.0 is above tis_clip=2.0"),
        (
            "rollout",
            {"rollout_temperature": -1.0},
            "rollout_temperature = -1.0: Input should be greater than",
        ),
    ],
)
def test_a_bad_objective_option_gets_one_message_from_a_campaign_file_and_from_the_objectives(
    section, settings, problem
):
    with pytest.raises(ObjectiveConfigError) as resolved:
        ObjectiveOptions.from_args(settings)
    with pytest.raises(ConfigError) as loaded:
        CampaignConfig.from_dict({section: settings})
    line = str(resolved.value).splitlines()[1].strip()
    assert line.startswith(problem) and line in str(loaded.value)

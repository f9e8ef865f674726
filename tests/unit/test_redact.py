"""Credentials inside URLs stay out of logs, sample metadata, artifacts' warnings and the stored config."""

from __future__ import annotations

import argparse
import asyncio
import logging

import pytest
import yaml
from aiohttp import web

from flows.artifacts import ArtifactPublisher
from slime_wf.config import CampaignConfig, ConfigError
from slime_wf.redact import redact_url
from slime_wf.rollout.rm_hub import RewardHub
from slime_wf.types import Sample

SECRETS = ("hunter2pw", "tok123secret", "sig456value")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "remote_rm https://alice:hunter2pw@rm.example:8000/score: HTTP 500",
            "remote_rm https://***@rm.example:8000/score: HTTP 500",
        ),
        (
            "GET https://rm.example/score?model=m&api_key=tok123secret#access_token=tok123secret.",
            "GET https://rm.example/score?model=m&api_key=***#access_token=***.",
        ),
        (
            "s3://bucket/train.parquet?X-Amz-Credential=AKIA%2Fx&X-Amz-Date=20260101&X-Amz-Signature=sig456value",
            "s3://bucket/train.parquet?X-Amz-Credential=***&X-Amz-Date=20260101&X-Amz-Signature=***",
        ),
        ("(see http://tok123secret@h/p?sig=sig456value)", "(see http://***@h/p?sig=***)"),
        ("redis://:hunter2pw@cache:6379/0", "redis://***@cache:6379/0"),
        ("https://u:p@ss@h/x", "https://***@h/x"),  # an unescaped @ in the password
        ("http://127.0.0.1:30000/generate?rid=a&n=1", "http://127.0.0.1:30000/generate?rid=a&n=1"),
        ("no URL here: token=abc", "no URL here: token=abc"),
    ],
)
def test_redact_url_masks_userinfo_and_secret_parameters_only(text, expected):
    assert redact_url(text) == expected
    assert redact_url(expected) == expected


RM_URL = "http://alice:hunter2pw@127.0.0.1:{port}/score?model=m&token=tok123secret"


def campaign_with_rm_url(url: str) -> CampaignConfig:
    return CampaignConfig.from_dict(
        {
            "data": {"prompt_data": "s3://bucket/p.jsonl?X-Amz-Signature=sig456value"},
            "reward": {"rm_type": "remote_rm", "rm_url": url},
        }
    )


def test_stored_config_masks_credentials_in_urls():
    cfg = campaign_with_rm_url(RM_URL.format(port=1))
    text = cfg.to_yaml()  # what the campaign writes to config.yaml
    assert not any(s in text for s in SECRETS)
    assert yaml.safe_load(text)["reward"]["rm_url"] == "http://***@127.0.0.1:1/score?model=m&token=***"
    assert "hunter2pw" in cfg.to_yaml(redact=False)  # the unmasked form stays available to code that needs it


def test_config_errors_mask_credentials_and_never_echo_a_pasted_secret():
    with pytest.raises(ConfigError) as err:
        CampaignConfig.from_dict({"reward": {"rm_url": ["http://alice:hunter2pw@h/score"]}})
    assert "hunter2pw" not in str(err.value) and "http://***@h/score" in str(err.value)
    with pytest.raises(
        ConfigError, match="reward.rm_api_key_env: must be the name of an environment variable"
    ) as err:
        CampaignConfig.from_dict({"reward": {"rm_api_key_env": "sk-tok123secret"}})
    assert "tok123secret" not in str(err.value)


async def reward_server(handler):
    app = web.Application()
    app.router.add_post("/score", handler)
    runner = web.AppRunner(app, access_log=None)  # the test server's own log is not under test
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, runner.addresses[0][1]


def rm_args(url: str, **overrides) -> argparse.Namespace:
    base = dict(
        rm_type="remote_rm",
        reward_key=None,
        custom_rm_path=None,
        group_rm=False,
        rm_url=url,
        rm_timeout=1.5,
        rm_failure_reward=-7.0,
        rm_on_error="failure_reward",
        rm_workers=None,
    )
    return argparse.Namespace(**{**base, **overrides})


@pytest.mark.parametrize(
    "answer",
    [
        lambda: web.Response(status=503, text="busy"),  # retried, logged, then a timeout
        lambda: web.Response(status=400, text="bad"),  # an error given rm_failure_reward
        lambda: web.Response(status=200, text="NaN", content_type="application/json"),  # a non-finite reward
    ],
    ids=["timeout", "error", "non-finite"],
)
def test_failing_remote_rm_never_shows_the_url_credentials(answer, caplog):
    caplog.set_level(logging.DEBUG)

    async def main():
        async def handle(request):
            await request.read()
            return answer()

        runner, port = await reward_server(handle)
        try:
            async with RewardHub(num_workers=1) as hub:
                sample = Sample(index=3, prompt="1+1?", response="2", label="2")
                reward = await hub.async_rm(rm_args(RM_URL.format(port=port)), sample)
                return reward, sample.metadata
        finally:
            await runner.cleanup()

    reward, metadata = asyncio.run(main())
    assert reward == -7.0
    assert "remote_rm http://***@127.0.0.1:" in metadata["rm_failure"]  # still says which server
    assert not any(s in repr(metadata) for s in SECRETS), metadata
    assert caplog.records and not any(s in caplog.text for s in SECRETS), caplog.text


def test_artifact_warnings_mask_url_credentials(caplog):
    def send(kind, key, description, content):
        raise ConnectionError("POST http://admin:hunter2pw@prefect.internal:4200/api/artifacts/ failed")

    logger = logging.getLogger("test-artifacts-redaction")
    with caplog.at_level(logging.WARNING, logger=logger.name):
        with ArtifactPublisher("demo", send=send, logger=logger) as artifacts:
            artifacts.progress(1, 2)
    assert "http://***@prefect.internal:4200" in caplog.text and "hunter2pw" not in caplog.text

"""The shipped accelerate configs (recipes/accelerate/*.yaml) load with accelerate's own classes and launch code.

They are YAML so that the recipe tests (recipes/**/*.json) never take them for recipes. No GPU is needed: the test
runs what `accelerate launch --config_file` does up to starting processes, then builds the plugin that each process
would build from the environment the launcher exports.
"""

import pytest
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DeepSpeedPlugin, DistributedType, FullyShardedDataParallelPlugin
from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

from conftest import REPO


CONFIGS = sorted((REPO / "recipes" / "accelerate").glob("*.yaml"))
EXPECTED = {
    "ddp": DistributedType.MULTI_GPU,
    "fsdp": DistributedType.FSDP,
    "deepspeed-zero2": DistributedType.DEEPSPEED,
    "deepspeed-zero3": DistributedType.DEEPSPEED,
}


def test_every_strategy_has_a_config():
    assert {path.stem for path in CONFIGS} == set(EXPECTED)
    assert not list((REPO / "recipes" / "accelerate").glob("*.json")), "a .json here would be checked as a recipe"


def launch_args(path):
    """The launch arguments after `accelerate launch --config_file path -m ia3_trainer train tiny` merged the file."""
    parser = launch_command_parser()
    args = parser.parse_args(["--config_file", str(path), "-m", "ia3_trainer", "train", "tiny"])
    args, _, _ = _validate_launch_command(args)
    return args


def export(monkeypatch, env):
    for key, value in env.items():
        if key.startswith(("ACCELERATE_", "FSDP_")):
            monkeypatch.setenv(key, value)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda path: path.stem)
def test_config_loads_and_builds_its_plugin(path, monkeypatch):
    config = load_config_from_file(str(path))  # ClusterConfig.from_yaml_file: an unknown top-level key raises
    assert isinstance(config, ClusterConfig)
    assert config.distributed_type == EXPECTED[path.stem]
    assert config.num_machines == 1 and config.num_processes >= 2 and not config.use_cpu
    assert config.mixed_precision == "bf16"  # T5-family models overflow in fp16

    # accelerate copies fsdp_config / deepspeed_config entries onto launch arguments without checking the names,
    # so a misspelt key would be dropped in silence: each must be a real launch argument.
    known = set(vars(launch_command_parser().parse_args(["x.py"])))
    for key in config.fsdp_config:
        assert (key if key.startswith("fsdp") else f"fsdp_{key}") in known, key
    for key in config.deepspeed_config:
        assert key in known, key

    args = launch_args(path)
    assert args.num_processes == config.num_processes
    if config.distributed_type == DistributedType.MULTI_GPU:
        assert args.multi_gpu and not args.use_fsdp and not args.use_deepspeed
    elif config.distributed_type == DistributedType.FSDP:
        export(monkeypatch, prepare_multi_gpu_env(args))
        plugin = FullyShardedDataParallelPlugin()
        assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
        assert plugin.state_dict_type.name == "FULL_STATE_DICT"
        assert plugin.transformer_cls_names_to_wrap is None  # taken from the model's _no_split_modules
    else:
        # What `accelerate launch` adds before it prepares the DeepSpeed environment (launch_command).
        args.deepspeed_fields_from_accelerate_config = ",".join([*config.deepspeed_config, "mixed_precision"])
        export(monkeypatch, prepare_deepspeed_cmd_env(args)[1])
        plugin = DeepSpeedPlugin()
        stage = int(path.stem[-1])
        assert plugin.zero_stage == stage
        assert plugin.deepspeed_config["zero_optimization"]["stage"] == stage
        assert plugin.deepspeed_config["gradient_accumulation_steps"] == "auto"  # from the recipe's training section
        if stage == 3:
            assert plugin.zero3_init_flag
            assert plugin.deepspeed_config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"]

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from collector.config import WorkloadRule
from collector.workloads.identity import WorkloadIdentity
from collector.workloads.procfs import ProcessStatic, ProcessTable
from collector.workloads.resolve import RECOGNISERS, Resolver, recognise, recogniser_table_markdown
from tests.fakes.proc import FakeProc

POD_UID = "5f3c1a2b-7d4e-4f10-9a8b-0c1d2e3f4a5b"
CONTAINER_ID = "3b1f0c9e8d7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1e0f9a8b7c6d5e4f3a2b1c"
K8S_CGROUP = (
    "0::/kubepods.slice/kubepods-burstable.slice/"
    f"kubepods-burstable-pod{POD_UID.replace('-', '_')}.slice/cri-containerd-{CONTAINER_ID}.scope\n"
)


class World:
    """A fake /proc with the table and resolver over it."""

    def __init__(self, root: Path, rules: Sequence[WorkloadRule] = ()) -> None:
        self.proc = FakeProc(root)
        self.proc.add(1, 0, "systemd", ["/sbin/init", "splash"], starttime=1)
        self.table = ProcessTable(self.proc.root)
        self.resolver = Resolver(rules)
        self.static_calls = 0

    def statics(self, pid: int, starttime: int) -> ProcessStatic | None:
        self.static_calls += 1
        return self.table.static(pid, starttime)

    def resolve(self, pid: int) -> WorkloadIdentity:
        snapshot = self.table.scan()
        self.resolver.prune(snapshot)
        return self.resolver.resolve(pid, snapshot, self.statics)

    def add(
        self,
        pid: int,
        ppid: int,
        cmdline: str | Sequence[str],
        environ: Mapping[str, str] | None = None,
        cgroup: str | None = None,
        comm: str | None = None,
    ) -> None:
        argv = cmdline.split() if isinstance(cmdline, str) else list(cmdline)
        self.proc.add(pid, ppid, comm or (argv[0].rsplit("/", 1)[-1][:15] if argv else "?"), argv, environ, cgroup)

    def starttime(self, pid: int) -> int:
        return self.proc.processes[pid].starttime


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path / "proc")


def rule(match: str, **kwargs: str) -> WorkloadRule:
    return WorkloadRule(match_cmdline=match, **kwargs)


# --- the steps, one at a time


def test_fallback_is_the_executable_name(world: World) -> None:
    world.add(100, 1, "/usr/bin/python3 serve.py --port 8000")
    identity = world.resolve(100)
    assert identity == WorkloadIdentity("python3", "unknown", origin="executable")


def test_fallback_for_a_kernel_thread_is_its_comm(world: World) -> None:
    world.proc.add(2, 0, "kthreadd", [], cgroup="0::/\n")
    world.proc.add(95, 2, "kworker/3:1H", [], cgroup="0::/\n")
    assert world.resolve(95) == WorkloadIdentity("kworker/3:1H", "unknown", origin="executable")


def test_environment_names_the_workload(world: World) -> None:
    env = {"WATTMETER_WORKLOAD": "llama-sft", "WATTMETER_PHASE": "training", "WATTMETER_JOB": "run-7"}
    world.add(100, 1, "/usr/bin/python3 train.py", environ=env)
    assert world.resolve(100) == WorkloadIdentity("llama-sft", "training", job="run-7", origin="environment")


def test_environment_with_an_invalid_phase_is_unknown(world: World) -> None:
    world.add(100, 1, "python3 vllm_wrapper.py", environ={"WATTMETER_WORKLOAD": "x", "WATTMETER_PHASE": "tranining"})
    assert world.resolve(100).phase == "unknown"


def test_environment_without_a_phase_takes_the_recognisers(world: World) -> None:
    world.add(100, 1, "torchrun --nproc_per_node=8 train.py", environ={"WATTMETER_WORKLOAD": "x"})
    assert world.resolve(100).key() == ("x", "training", "")


def test_slurm_job_id_is_the_job_unless_wattmeter_job_is_set(world: World) -> None:
    world.add(100, 1, "python3 a.py", environ={"WATTMETER_WORKLOAD": "a", "SLURM_JOB_ID": "4242"})
    world.add(101, 1, "python3 b.py", environ={"WATTMETER_WORKLOAD": "b", "SLURM_JOB_ID": "4243", "WATTMETER_JOB": "j"})
    a = world.resolve(100)
    b = world.resolve(101)
    assert (a.job, a.slurm_job) == ("4242", "4242")
    assert (b.job, b.slurm_job) == ("j", "4243")


def test_slurm_job_id_alone_fills_the_job_of_a_recognised_process(world: World) -> None:
    world.add(100, 1, "torchrun --nproc_per_node=4 train.py", environ={"SLURM_JOB_ID": "777"})
    identity = world.resolve(100)
    assert identity.key() == ("torchrun", "training", "777")
    assert identity.origin == "recogniser"
    assert identity.slurm_job == "777"


def test_rule_names_the_workload(tmp_path: Path) -> None:
    world = World(tmp_path / "proc", [rule(r"train\.py .*--config llama", workload="llama", phase="training", job="x")])
    world.add(100, 1, "python3 train.py --config llama.yaml")
    world.add(101, 1, "python3 train.py --config bert.yaml")
    assert world.resolve(100) == WorkloadIdentity("llama", "training", job="x", origin="rule")
    assert world.resolve(101).origin == "executable"


def test_rule_without_workload_uses_the_executable_and_first_rule_wins(tmp_path: Path) -> None:
    rules = [rule(r"batch_infer", phase="inference"), rule(r"batch", workload="later", phase="training")]
    world = World(tmp_path / "proc", rules)
    world.add(100, 1, "/opt/bin/batch_infer --shard 3")
    assert world.resolve(100) == WorkloadIdentity("batch_infer", "inference", origin="rule")


def test_rule_without_phase_takes_the_recognisers(tmp_path: Path) -> None:
    world = World(tmp_path / "proc", [rule(r"serve", workload="chatbot")])
    world.add(100, 1, "vllm serve meta-llama/Llama-3.1-8B-Instruct")
    world.add(101, 1, "python3 my_serve.py")
    assert world.resolve(100).key() == ("chatbot", "inference", "")
    assert world.resolve(101).key() == ("chatbot", "unknown", "")


def test_registration_names_the_workload(world: World) -> None:
    world.add(100, 1, "python3 app.py")
    world.resolver.set_registration(100, world.starttime(100), WorkloadIdentity("chat", "inference", job="prod"))
    assert world.resolve(100) == WorkloadIdentity("chat", "inference", job="prod", origin="registration")


# --- precedence


def test_precedence_on_one_process(tmp_path: Path) -> None:
    world = World(tmp_path / "proc", [rule(r"vllm", workload="by-rule", phase="inference")])
    env = {"WATTMETER_WORKLOAD": "by-env", "WATTMETER_PHASE": "inference"}
    world.add(100, 1, "vllm serve org/Model", environ=env)
    world.add(101, 1, "vllm serve org/Model")
    world.add(102, 1, "python3 -m vllm.entrypoints.openai.api_server --model org/Model", comm="python3")
    world.resolver.set_registration(100, world.starttime(100), WorkloadIdentity("by-registration", "inference"))
    assert world.resolve(100).workload == "by-registration"
    world.resolver.drop_registration(100)
    assert world.resolve(100).workload == "by-env"
    assert world.resolve(101).workload == "by-rule"
    without_rules = World(tmp_path / "proc2")
    without_rules.add(102, 1, "python3 -m vllm.entrypoints.openai.api_server --model org/Model")
    assert without_rules.resolve(102).workload == "Model"


def test_an_earlier_step_on_an_ancestor_beats_a_later_step_on_the_process(tmp_path: Path) -> None:
    world = World(tmp_path / "proc", [rule(r"worker\.py", workload="by-rule")])
    world.add(100, 1, "python3 launcher.py", environ={"WATTMETER_WORKLOAD": "by-parent-env"})
    world.add(101, 100, "vllm serve org/Model")  # a recogniser would match the process itself
    world.add(102, 100, "python3 worker.py")  # a rule would match the process itself
    assert world.resolve(101).workload == "by-parent-env"
    assert world.resolve(102).workload == "by-parent-env"


def test_registration_of_an_ancestor_beats_environment_of_the_process(world: World) -> None:
    world.add(100, 1, "python3 app.py")
    world.add(101, 100, "python3 child.py", environ={"WATTMETER_WORKLOAD": "by-env"})
    world.resolver.set_registration(100, world.starttime(100), WorkloadIdentity("registered", "training"))
    identity = world.resolve(101)
    assert (identity.workload, identity.origin) == ("registered", "registration")


def test_the_process_own_step_beats_the_same_step_on_an_ancestor(world: World) -> None:
    world.add(100, 1, "python3 a.py", environ={"WATTMETER_WORKLOAD": "parent"})
    world.add(101, 100, "python3 b.py", environ={"WATTMETER_WORKLOAD": "child"})
    assert world.resolve(101).workload == "child"


# --- inheritance


def test_torchrun_workers_inherit_the_launcher_environment(world: World) -> None:
    env = {"WATTMETER_WORKLOAD": "llama-70b-pretrain", "WATTMETER_PHASE": "training", "WATTMETER_JOB": "run-42"}
    world.add(500, 1, "/bin/bash /home/ada/launch.sh")
    world.add(501, 500, "/usr/bin/python3 /usr/local/bin/torchrun --nproc_per_node=8 train.py", environ=env)
    for rank in range(8):
        world.add(510 + rank, 501, f"/usr/bin/python3 -u train.py --local-rank={rank}")
    world.add(600, 510, "/usr/bin/python3 -u train.py --local-rank=0", comm="pt_data_worker")  # DataLoader worker
    for pid in [501, *range(510, 518), 600]:
        assert world.resolve(pid).key() == ("llama-70b-pretrain", "training", "run-42"), pid
    assert world.resolve(500).origin == "executable"  # a parent does not inherit from its children


def test_workers_inherit_a_recognised_launcher(world: World) -> None:
    world.add(700, 1, "/usr/bin/python3 /usr/local/bin/vllm serve meta-llama/Llama-3.1-8B-Instruct")
    world.add(701, 700, "/usr/bin/python3 -c from multiprocessing.spawn import spawn_main; spawn_main()")
    assert world.resolve(701) == WorkloadIdentity("Llama-3.1-8B-Instruct", "inference", origin="recogniser")


def test_inheritance_stops_below_pid_1(world: World) -> None:
    world.proc.add(1, 0, "systemd", ["/sbin/init"], environ={"WATTMETER_WORKLOAD": "everything"}, starttime=1)
    world.add(100, 1, "/usr/sbin/sshd -D")
    assert world.resolve(100).workload == "sshd"
    assert world.resolve(1).workload == "everything"  # pid 1 itself still resolves


def test_ppid_loop_does_not_hang(world: World) -> None:
    world.proc.add(100, 101, "a", ["a"], starttime=50)
    world.proc.add(101, 100, "b", ["b"], starttime=50)
    assert world.resolve(100).workload == "a"


def test_parent_pid_reused_by_a_younger_process_is_not_inherited_from(world: World) -> None:
    world.proc.add(100, 1, "python3", ["python3", "new.py"], environ={"WATTMETER_WORKLOAD": "new"}, starttime=900)
    world.proc.add(200, 100, "python3", ["python3", "orphan.py"], starttime=500)  # its real parent 100 has exited
    assert world.resolve(200).workload == "python3"


def test_unknown_parent_stops_the_walk(world: World) -> None:
    world.add(200, 12345, "python3 orphan.py")
    assert world.resolve(200).origin == "executable"


# --- cgroup fields, whichever step named the workload


def test_kubernetes_fields_fill_a_recognised_identity(world: World) -> None:
    world.add(100, 1, "python3 -m sglang.launch_server --model-path Qwen/Qwen2.5-7B-Instruct", cgroup=K8S_CGROUP)
    identity = world.resolve(100)
    assert identity == WorkloadIdentity(
        "Qwen2.5-7B-Instruct", "inference", pod=POD_UID, container=CONTAINER_ID, origin="recogniser"
    )
    assert identity.namespace == ""  # not in /proc


def test_cgroup_fields_fill_a_registered_identity_but_do_not_override_it(world: World) -> None:
    world.add(100, 1, "python3 app.py", cgroup=K8S_CGROUP)
    world.add(101, 1, "python3 app.py", cgroup=K8S_CGROUP)
    world.resolver.set_registration(100, world.starttime(100), WorkloadIdentity("chat", "inference"))
    world.resolver.set_registration(
        101, world.starttime(101), WorkloadIdentity("chat", "inference", namespace="prod", pod="chat-7d9f")
    )
    plain = world.resolve(100)
    named = world.resolve(101)
    assert (plain.pod, plain.container) == (POD_UID, CONTAINER_ID)
    assert (named.namespace, named.pod, named.container) == ("prod", "chat-7d9f", CONTAINER_ID)


def test_cgroup_fields_come_from_the_process_itself_not_the_ancestor(world: World) -> None:
    world.add(100, 1, "python3 a.py", environ={"WATTMETER_WORKLOAD": "w"}, cgroup="0::/system.slice/train.service\n")
    world.add(101, 100, "python3 b.py", cgroup="0::/system.slice/other.service\n")
    assert world.resolve(101).unit == "other.service"


def test_systemd_unit_fills_an_environment_identity(world: World) -> None:
    world.add(100, 1, "python3 a.py", environ={"WATTMETER_WORKLOAD": "w"}, cgroup="0::/system.slice/vllm.service\n")
    assert world.resolve(100).unit == "vllm.service"


def test_slurm_cgroup_fills_slurm_job_and_the_job(world: World) -> None:
    world.add(100, 1, "python3 train.py", cgroup="0::/system.slice/slurmstepd.scope/job_31337/step_0/user/task_0\n")
    identity = world.resolve(100)
    assert (identity.job, identity.slurm_job) == ("31337", "31337")


# --- caching and registrations


def test_answers_are_cached_per_process(world: World) -> None:
    world.add(100, 1, "python3 train.py")
    world.add(101, 100, "python3 worker.py")
    first = world.resolve(101)
    calls = world.static_calls
    assert calls > 0
    assert world.resolve(101) is first
    assert world.static_calls == calls


def test_pid_reuse_resolves_again(world: World) -> None:
    world.add(100, 1, "vllm serve org/First")
    assert world.resolve(100).workload == "First"
    world.proc.remove(100)
    world.add(100, 1, "vllm serve org/Second")
    assert world.resolve(100).workload == "Second"


def test_registration_changes_invalidate_cached_answers(world: World) -> None:
    world.add(100, 1, "python3 app.py")
    world.add(101, 100, "python3 worker.py")
    assert world.resolve(101).workload == "python3"
    world.resolver.set_registration(100, world.starttime(100), WorkloadIdentity("chat", "inference"))
    assert world.resolve(101).workload == "chat"
    world.resolver.drop_registration(100)
    assert world.resolve(101).workload == "python3"


def test_registration_does_not_outlive_its_process(world: World) -> None:
    world.add(100, 1, "python3 app.py")
    world.resolver.set_registration(100, world.starttime(100), WorkloadIdentity("chat", "inference"))
    world.proc.remove(100)
    world.add(100, 1, "python3 other.py")  # same pid, new process
    assert world.resolve(100).workload == "python3"
    assert world.resolver.registrations() == {}  # pruned at the scan


def test_registrations_given_by_pid_bind_to_the_first_process_seen(tmp_path: Path) -> None:
    world = World(tmp_path / "proc")
    world.add(100, 1, "python3 app.py")
    world.resolver = Resolver(registrations={100: WorkloadIdentity("chat", "inference")})
    assert world.resolve(100).workload == "chat"
    world.proc.remove(100)
    world.add(100, 1, "python3 other.py")
    assert world.resolve(100).workload == "python3"


def test_pid_not_in_the_snapshot_is_unknown(world: World) -> None:
    assert world.resolve(99999) == WorkloadIdentity("unknown", "unknown")


def test_prune_drops_answers_for_gone_processes(world: World) -> None:
    world.add(100, 1, "python3 a.py")
    world.add(101, 1, "python3 b.py")
    world.resolve(100)
    world.resolve(101)
    assert world.resolver.cached() == 2
    world.proc.remove(101)
    world.resolve(100)
    assert world.resolver.cached() == 1


# --- built-in recognisers


@pytest.mark.parametrize(
    ("cmdline", "workload", "phase"),
    [
        # vLLM
        (
            "/usr/bin/python3 /usr/local/bin/vllm serve meta-llama/Llama-3.1-8B-Instruct --port 8000",
            "Llama-3.1-8B-Instruct",
            "inference",
        ),
        ("vllm serve /models/Qwen2.5-72B-Instruct/ --tensor-parallel-size 4", "Qwen2.5-72B-Instruct", "inference"),
        ("vllm serve --model mistralai/Mistral-7B-v0.1 --dtype auto", "Mistral-7B-v0.1", "inference"),
        (
            "python3 -m vllm.entrypoints.openai.api_server --model=/data/hf/deepseek-ai/DeepSeek-V3 --tp 8",
            "DeepSeek-V3",
            "inference",
        ),
        ("python3 -m vllm.entrypoints.api_server", "vllm", "inference"),
        # SGLang
        (
            "python3 -m sglang.launch_server --model-path meta-llama/Meta-Llama-3-8B --port 30000",
            "Meta-Llama-3-8B",
            "inference",
        ),
        ("python -m sglang.launch_server --port 30000", "sglang", "inference"),
        # TGI
        ("text-generation-launcher --model-id bigscience/bloom-560m --num-shard 1", "bloom-560m", "inference"),
        (
            "/opt/conda/bin/python3.11 /opt/conda/bin/text-generation-server serve bigscience/bloom-560m"
            " --uds-path /tmp/x",
            "tgi",
            "inference",
        ),
        # Triton
        ("/opt/tritonserver/bin/tritonserver --model-repository=/models --http-port 8000", "triton", "inference"),
        ("tritonserver --model-store=/models", "triton", "inference"),
        # Ollama
        ("/usr/local/bin/ollama serve", "ollama", "inference"),
        (
            "/usr/local/bin/ollama runner --model /root/.ollama/models/blobs/sha256-6a0746a1ec1a"
            " --ctx-size 8192 --port 41523",
            "ollama",
            "inference",
        ),
        # llama.cpp
        (
            "./llama-server -m /models/llama-3-8b-instruct.Q4_K_M.gguf -c 4096 --port 8080",
            "llama-3-8b-instruct.Q4_K_M.gguf",
            "inference",
        ),
        ("/home/ada/llama.cpp/server --model models/7B/ggml-model-q4_0.gguf", "ggml-model-q4_0.gguf", "inference"),
        ("/opt/llama.cpp/build/bin/llama-server --port 8080", "llama.cpp", "inference"),
        # TensorRT-LLM
        (
            "trtllm-serve meta-llama/Llama-3.1-70B-Instruct --tp_size 8 --port 8000",
            "Llama-3.1-70B-Instruct",
            "inference",
        ),
        ("trtllm-serve serve /engines/llama3-8b --backend pytorch", "llama3-8b", "inference"),
        (
            "python3 /app/tensorrt_llm/examples/run.py --engine_dir /engines/gptj-6b/ --max_output_len 100",
            "gptj-6b",
            "inference",
        ),
        # torchrun and friends
        ("/usr/bin/python3 /usr/local/bin/torchrun --nnodes=2 --nproc_per_node=8 train.py", "torchrun", "training"),
        ("python3 -m torch.distributed.run --nproc_per_node 4 finetune.py", "torchrun", "training"),
        ("python -m torch.distributed.launch --nproc_per_node=2 main.py", "torchrun", "training"),
        # DeepSpeed
        (
            "/usr/bin/python3 /usr/local/bin/deepspeed --num_gpus 8 train.py --deepspeed ds_zero3.json",
            "deepspeed",
            "training",
        ),
        (
            "/usr/bin/python3 -u -m deepspeed.launcher.launch --world_info=eyJsb2NhbGhvc3QiOiBbMF19"
            " --master_addr=127.0.0.1 train.py",
            "deepspeed",
            "training",
        ),
        # Accelerate
        (
            "/usr/bin/python3 /usr/local/bin/accelerate launch --num_processes 8 --mixed_precision bf16 sft.py",
            "accelerate",
            "training",
        ),
        ("python3 -m accelerate.commands.launch --multi_gpu train.py", "accelerate", "training"),
        # Megatron
        (
            "python pretrain_gpt.py --tensor-model-parallel-size 4 --num-layers 24 --hidden-size 1024",
            "megatron",
            "training",
        ),
        ("python3 /workspace/Megatron-LM/pretrain_bert.py --num-layers 24", "megatron", "training"),
        # Lightning
        ("/usr/bin/python3 /usr/local/bin/lightning fit --config configs/gpt.yaml", "lightning", "training"),
        ("python3 -m pytorch_lightning.cli fit --trainer.max_epochs 10", "lightning", "training"),
        ("python3 -m lightning.pytorch.cli fit -c cfg.yaml", "lightning", "training"),
    ],
)
def test_builtin_recognisers(world: World, cmdline: str, workload: str, phase: str) -> None:
    world.add(100, 1, cmdline)
    identity = world.resolve(100)
    assert (identity.workload, identity.phase, identity.origin) == (workload, phase, "recogniser")


@pytest.mark.parametrize(
    "cmdline",
    [
        "/usr/bin/python3 serve.py",
        "vim notes/vllm.md",
        "grep -r torch.distributed src/",
        "/usr/sbin/sshd -D",
        "ollama list",
        "python3 -m pytorch_lightning.utilities.collect_env_details",
        "/usr/bin/accelerate-config",
    ],
)
def test_lookalikes_are_not_recognised(world: World, cmdline: str) -> None:
    world.add(100, 1, cmdline)
    assert world.resolve(100).origin == "executable"


def test_setproctitle_cmdline_is_recognised() -> None:
    recognised = recognise(("vllm serve org/Model --port 8000",))
    assert recognised is not None
    assert recognised[1] == "Model"


def test_every_table_example_is_recognised_as_its_own_entry() -> None:
    for recogniser in RECOGNISERS:
        recognised = recognise(tuple(recogniser.example.split()))
        assert recognised is not None, recogniser.name
        assert recognised[0] is recogniser


def test_table_renders_for_the_readme() -> None:
    table = recogniser_table_markdown()
    assert len(table.splitlines()) == len(RECOGNISERS) + 2
    for recogniser in RECOGNISERS:
        assert f"| {recogniser.name} | {recogniser.phase} |" in table

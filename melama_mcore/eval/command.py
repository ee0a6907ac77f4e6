"""`melama eval`: score a model on MIBE (and any lm-evaluation-harness task) with lm-evaluation-harness;
`melama eval rescore`: score a run again from its samples files, without a model.

    melama eval --model outputs/run --tasks mibe --data-dir mibe_data --out results/run
    melama eval --model me-llama-13b-chat-hf --tasks pubmedqa,medqa,mmlu --out results/chat --log-samples
    melama eval rescore results/chat --out results/chat-strict --extractor strict

--model is a run folder, a checkpoint folder (this project's megatron checkpoint, any TP/PP; exported
to a temporary Hugging Face folder on the fly; a LoRA run: its base, from its checkpoint.init_from,
with its adapters applied) or a Hugging Face folder. Generation is greedy with at most 256 new
tokens, zero-shot unless --num-fewshot, as in the Me-LLaMA paper. Scores follow the released scorer
(`--extractor mibe-compat`, the default) and are computed under `strict` too. Prompts are the model's
own chat template when it carries one (a tuned run's: the template it was tuned with, which its
exports carry), else plain (--chat-template, --chat, --no-chat to choose).

Writes OUT/results.json ({"protocol": {...}, task: {metric: value}}), OUT/results.md (dataset x metric
tables) and, with --log-samples, OUT/samples_<task>.jsonl for each MIBE task (prompts, generations
and records: test inputs may be patient text, so this is opt-in). Scoring: docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib.util
import logging
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from melama_mcore.cli import positive_int
from melama_mcore.errors import DataError, UserError
from melama_mcore.eval import backends, model_source, prompts, report
from melama_mcore.eval.extraction import DEFAULT_EXTRACTOR, check_extractor
from melama_mcore.eval.rescore import add_extractor_argument
from melama_mcore.eval.scoring import Generated, task_result
from melama_mcore.eval.tasks import GENERATION_BUDGET, GROUP, TASK_DIR, TASKS
from melama_mcore.output_paths import check_output_dir, remove_created_folders

log = logging.getLogger(__name__)

VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)  # max_lora_rank values vLLM accepts


@dataclass
class EvalOptions:
    model: Path
    tasks: list[str]
    out: Path
    adapter: Path | None = None
    data_dir: Path | None = None
    backend: str = "hf"
    limit: int | None = None
    num_fewshot: int | None = None
    extractor: str = DEFAULT_EXTRACTOR
    log_samples: bool = False
    chat: bool | None = None  # True: chat prompts (--chat); False: plain (--no-chat); None: the model's template, if any
    chat_template: str | None = None  # a template name or Jinja file (--chat-template); wins over `chat`
    max_new_tokens: int = GENERATION_BUDGET  # the paper's; a smaller budget only from Python (the demo)
    tokenizer: Path | None = None  # a megatron checkpoint's tokenizer instead of its data.tokenizer (--tokenizer)
    allow_tokenizer_mismatch: bool = False  # evaluate although its vocabulary is not the checkpoint's


# ---------------------------------------------------------------------------------------------
# Tasks
# ---------------------------------------------------------------------------------------------
def task_names(text: str) -> list[str]:
    names = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    if not names:
        raise UserError("--tasks: name at least one task (e.g. mibe, pubmedqa, mmlu)")
    return names


class _LmEvalAdvice(logging.Filter):
    """lm-eval's advice to its own command line's users, which `melama eval` already follows: pass
    `--metadata` to tasks with their own loader; mind sampling when overriding generation settings."""

    PHRASES = ("Custom kwargs can be passed", "specified through cli")

    def filter(self, record):
        return not any(phrase in record.getMessage() for phrase in self.PHRASES)


_LM_EVAL_ADVICE = _LmEvalAdvice()


def quiet_libraries() -> None:
    """Warnings and errors only from the libraries (lm-eval logs every task's configuration at INFO);
    progress comes from lm-eval's generation bar and this module's lines."""
    for name in ("megatron", "lm_eval", "lm-eval", "datasets", "transformers", "absl", "httpx"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for name in ("lm_eval.api.task", "lm_eval.evaluator"):
        logging.getLogger(name).addFilter(_LM_EVAL_ADVICE)


def load_tasks(names: list[str], metadata: dict) -> tuple[object, dict[str, list]]:
    """lm-eval's TaskManager (MIBE's folder when a MIBE name is asked for, lm-eval's own tasks when
    another name is: MIBE's pubmedqa and medmcqa replace lm-eval's tasks of those names) and the loaded
    task or group objects per requested name; loading reads and checks every dataset now, before a model
    is exported or loaded."""
    from lm_eval.tasks import TaskManager

    if GROUP in names:  # the group holds every MIBE task once
        names = [n for n in names if n not in TASKS]
    general = [n for n in names if n not in TASKS and n != GROUP]
    manager = TaskManager(include_path=str(TASK_DIR) if len(general) < len(names) else None,
                          include_defaults=bool(general), metadata=metadata)
    unknown = [n for n in names if n not in manager.all_tasks]
    if unknown:
        close = difflib.get_close_matches(unknown[0], [*TASKS, GROUP, *manager.all_tasks], n=3)
        raise UserError(f"unknown task {unknown[0]!r}: MIBE tasks are {GROUP}, {', '.join(TASKS)}; other names "
                        "must be lm-eval tasks" + (f" (did you mean {', '.join(close)}?)" if close else ""))
    objects = {}
    for name in names:
        try:
            loaded = manager.load([name])
        except UserError:
            raise
        except Exception as err:  # lm-eval and datasets raise many types; the first line says what
            raise DataError(f"task {name}: cannot load it ({type(err).__name__}: "
                            f"{(str(err).splitlines() or [''])[0][:300]})") from None
        # a group, or its one task, or every task of a tag
        objects[name] = [loaded["groups"][name]] if name in loaded["groups"] else list(loaded["tasks"].values())
    return manager, objects


def leaf_tasks(objects: dict[str, list]) -> dict:
    """Every task to run, by name; a task reached from two requested names is refused (lm-eval would
    stop with a traceback)."""
    from lm_eval.api.group import Group

    tasks, source = {}, {}
    for name, built in objects.items():
        for obj in built:
            for task in (obj.get_all_tasks() if isinstance(obj, Group) else [obj]):
                if task.task_name in source and source[task.task_name] != name:
                    raise UserError(f"--tasks names {task.task_name} twice (in {source[task.task_name]} and "
                                    f"{name}): name it once")
                tasks[task.task_name], source[task.task_name] = task, name
    return tasks


def check_fewshot(tasks: dict, num_fewshot: int | None, data_dir: Path | None) -> None:
    for name, task in tasks.items():
        if name in TASKS and num_fewshot:
            available = len(task.dataset["train"])
            if available < num_fewshot:
                where = data_dir / f"{name}_train.jsonl" if data_dir else f"{TASKS[name].hub} (train split)"
                raise DataError(f"--num-fewshot {num_fewshot}: {name} has {available} training examples ({where})")


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------
def check_backend(backend: str) -> None:
    if backend == "vllm":
        if importlib.util.find_spec("vllm") is None:
            raise UserError("--backend vllm needs vLLM, which is not installed: on a GPU machine, "
                            "pip install 'melama-mcore[vllm]' (or use --backend hf)")
        import torch

        if not torch.cuda.is_available():
            raise UserError("--backend vllm needs NVIDIA GPUs; none is visible (use --backend hf on CPU)")


def model_arguments(backend: str, hf_dir: Path, adapter: Path | None, adapter_config: dict | None,
                    gpus: int) -> tuple[dict, dict]:
    """(lm-eval model_args, simple_evaluate's batch/device arguments) for the backend.
    hf: one device (CPU in fp32, or GPU in the checkpoint's dtype; several GPUs: lm-eval's
    `parallelize`, layers spread over them). vllm: tensor parallel over the node's GPUs (the largest
    count that divides the attention heads)."""
    if backend == "hf":
        args = {"pretrained": str(hf_dir), "dtype": "auto" if gpus else "float32"}
        if adapter:
            args["peft"] = str(adapter)
        if gpus > 1:
            args["parallelize"] = True
        return args, {"batch_size": "auto" if gpus else 1, "device": "cuda" if gpus else "cpu"}
    heads = model_source.model_config(hf_dir)["num_attention_heads"]
    args = {"pretrained": str(hf_dir), "dtype": "auto", "gpu_memory_utilization": 0.9,
            "tensor_parallel_size": max(d for d in range(1, max(gpus, 1) + 1) if heads % d == 0)}
    if adapter:
        rank = int((adapter_config or {}).get("r", 8))
        args.update(lora_local_path=str(adapter),
                    max_lora_rank=next((r for r in VLLM_LORA_RANKS if r >= rank), VLLM_LORA_RANKS[-1]))
    return args, {"batch_size": "auto"}


def check_context(hf_dir: Path, new_tokens: int) -> None:
    context = model_source.model_config(hf_dir).get("max_position_embeddings")
    if context is not None and context <= new_tokens:
        raise UserError(f"the model's context ({context} tokens, max_position_embeddings) leaves no room for a "
                        f"prompt before {new_tokens} new tokens")


# ---------------------------------------------------------------------------------------------
def selection(extractor: str, limit: int | None) -> str:
    """Which records a run scores, in words (results.json's protocol.selection)."""
    if limit is None:
        return "all records"
    if extractor == "mibe-compat":
        return f"the first {limit} records after the released evaluator's seed-42 shuffle"
    return f"the first {limit} records of each file"


def evaluate(options: EvalOptions) -> dict[str, dict[str, float | None]]:
    """Run the evaluation and write its outputs; returns {task: {metric: value}} (results.json without
    its protocol). --out is checked first; folders it created are removed again if the run fails."""
    quiet_libraries()
    check_extractor(options.extractor)
    if (options.out / "results.json").exists():
        raise UserError(f"{options.out} already holds results.json: choose a new --out or delete it")
    created = check_output_dir(options.out, "--out")
    try:
        return _evaluate(options)
    except BaseException:
        remove_created_folders(created)
        raise


def _evaluate(options: EvalOptions) -> dict[str, dict[str, float | None]]:
    import torch

    check_backend(options.backend)
    prompts.check_choice(options.chat_template)
    source = model_source.locate(options.model, options.tokenizer, options.allow_tokenizer_mismatch)
    if source.is_lora_run and options.adapter:
        raise UserError(f"--model {options.model} is a LoRA run, which carries its adapters; --adapter applies "
                        "other ones: evaluate one or the other")
    adapter_config = model_source.read_adapter_config(options.adapter) if options.adapter else None
    if options.adapter:
        model_source.check_adapter_rank(options.adapter, adapter_config)
    log.info("model %s%s", source, f" + PEFT adapter {options.adapter}" if options.adapter else "")

    metadata = {"data_dir": str(options.data_dir) if options.data_dir else None, "extractor": options.extractor}
    manager, objects = load_tasks(options.tasks, metadata)
    tasks = leaf_tasks(objects)
    check_fewshot(tasks, options.num_fewshot, options.data_dir)
    counts = {n: len(t.eval_docs) if options.limit is None else min(options.limit, len(t.eval_docs))
              for n, t in tasks.items()}
    log.info("%d task(s), %d records (%s): %s", len(tasks), sum(counts.values()),
             selection(options.extractor, options.limit), ", ".join(f"{n} {c}" for n, c in counts.items()))

    import lm_eval
    import lm_eval.evaluator

    # lm-eval records the git commit of the working directory with a `git describe` whose stderr
    # reaches the console ("fatal: not a git repository" outside one): the same, quietly.
    lm_eval.evaluator.get_git_commit_hash = _git_commit_of_working_directory
    # MIBE's prompts go through the run's prompt format (prompts.py): lm-eval's advice to apply the
    # tokenizer's chat template when a path says "chat" does not apply to them.
    logging.getLogger("lm_eval.evaluator").addFilter(lambda record: "chat variant" not in record.getMessage())
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with model_source.hf_folder(source, options.out) as model:
        hf_dir, adapter = model.hf_dir, model.adapter or options.adapter  # a LoRA run's own, or --adapter
        if options.adapter:
            model_source.check_adapter_fits(options.adapter, adapter_config, hf_dir)
        else:
            adapter_config = model_source.read_adapter_config(adapter) if adapter else None
        check_context(hf_dir, options.max_new_tokens)
        prompt_format = prompts.resolve(hf_dir, options.chat, options.chat_template, adapter,
                                        model.template_origin)
        log.info("MIBE prompts: %s", prompt_format)
        model_args, run_args = model_arguments(options.backend, hf_dir, adapter, adapter_config, gpus)
        log.info("generating with lm-eval's %s backend (%s), greedy, at most %d new tokens, %s",
                 options.backend, run_args.get("device", f"tensor parallel {model_args.get('tensor_parallel_size')}"),
                 options.max_new_tokens, f"{options.num_fewshot}-shot" if options.num_fewshot else "zero-shot")
        shorter = None if options.max_new_tokens == GENERATION_BUDGET else {"max_gen_toks": options.max_new_tokens}
        start = time.time()
        try:
            model = backends.load_model(options.backend, model_args, run_args, prompt_format)
        except Exception as err:  # transformers, peft and vLLM raise many types for a folder they cannot load
            raise DataError(f"--model {options.model}: lm-eval's {options.backend} backend cannot load it "
                            f"({type(err).__name__}: {(str(err).splitlines() or [''])[0][:300]})") from None
        results = lm_eval.simple_evaluate(
            model=model, task_manager=manager, tasks=[obj for built in objects.values() for obj in built],
            num_fewshot=options.num_fewshot, limit=options.limit, log_samples=True,  # MIBE is scored from them
            bootstrap_iters=0, gen_kwargs=shorter)
        seconds = time.time() - start
    total = sum(counts.values())
    log.info("evaluated %d records in %.0f s, model loading included (%.2f records/s)", total, seconds,
             total / max(seconds, 1e-9))

    table, samples = {}, {}
    for name in (n for n in TASKS if n in results.get("samples", {})):
        logged = results["samples"][name]
        records = [Generated(s["doc"], s["resps"][0][0], **model.generation_stats[(name, s["doc_id"])])
                   for s in logged]
        result = task_result(TASKS[name], records, options.extractor)
        table[name] = result.row
        if options.log_samples:
            prompt_of = {s["doc"]["mibe_index"]: s["arguments"][0][0] for s in logged}
            samples[name] = report.sample_lines(name, result, options.extractor,
                                                [prompt_of[r.doc["mibe_index"]] for r in result.records])
    general_table = report.collect(results)
    table.update(general_table)
    protocol = {"extractor": options.extractor, "template": prompt_format.describe(),
                "limit": options.limit, "selection": selection(options.extractor, options.limit),
                "max_new_tokens": options.max_new_tokens, "num_fewshot": options.num_fewshot,
                "backend": options.backend, "model": str(options.model),
                "adapter": str(options.adapter) if options.adapter else None,
                "data_dir": str(options.data_dir) if options.data_dir else None,
                "bertscore": report.bertscore_protocol(table), "lm_eval": lm_eval.__version__}
    header = [f"- model: `{options.model}`" + (f" + adapter `{options.adapter}`" if options.adapter else ""),
              *report.protocol_lines(protocol)]
    general = []  # the lm-eval names asked for; a tag or a group without a score of its own by its tasks
    for name in (n for n in objects if n not in TASKS and n != GROUP):
        general += [name] if name in table else sorted(t for t in leaf_tasks({name: objects[name]}) if t in table)
    report.write_outputs(options.out, report.results_json(protocol, table),
                         report.markdown(table, header, general, options.extractor), samples)
    return table


def _git_commit_of_working_directory() -> str | None:
    try:
        return subprocess.run(["git", "describe", "--always"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def build_parser() -> argparse.ArgumentParser:
    def non_negative(text: str) -> int:
        value = int(text)
        if value < 0:
            raise argparse.ArgumentTypeError(f"{text}: expected 0 or more")
        return value

    parser = argparse.ArgumentParser(prog="melama eval", description=__doc__,
                                     usage="melama eval --model PATH --tasks NAMES --out DIR [options]\n"
                                           "       melama eval rescore RUN_DIR --out DIR [--extractor NAME] "
                                           "(see melama eval rescore --help)",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, type=Path,
                        help="run folder (a LoRA run: its base plus its adapters), megatron checkpoint folder (any "
                             "TP/PP) or Hugging Face folder")
    parser.add_argument("--adapter", type=Path, help="a PEFT (LoRA) adapter folder to apply to the model")
    parser.add_argument("--tokenizer", type=Path,
                        help="a megatron checkpoint's tokenizer, instead of the one its config.yaml names "
                             "(data.tokenizer); it must have the vocabulary the checkpoint recorded")
    parser.add_argument("--allow-tokenizer-mismatch", action="store_true",
                        help="evaluate a megatron checkpoint with a tokenizer whose vocabulary is not the one it "
                             "was trained with (refused by default: its token ids would mean other text)")
    parser.add_argument("--tasks", required=True, type=task_names,
                        help=f"comma-separated: {GROUP} (all twelve), {', '.join(TASKS)}, and any lm-eval task "
                             "or group (e.g. mmlu, arc_easy)")
    parser.add_argument("--out", required=True, type=Path, help="folder for results.json, results.md, samples")
    parser.add_argument("--data-dir", type=Path,
                        help="local MIBE records: DIR/<task>.jsonl (or .json/.parquet) in the released schema, "
                             "DIR/<task>_train.jsonl for few-shot examples (default: the public sets on the Hub)")
    parser.add_argument("--backend", choices=["hf", "vllm"], default="hf",
                        help="hf: transformers on CPU or GPU (default); vllm: GPUs, tensor parallel")
    parser.add_argument("--limit", type=positive_int,
                        help="evaluate N records of each task: under mibe-compat the first N after the released "
                             "evaluator's seed-42 shuffle (the records it scored), under strict the first N")
    parser.add_argument("--num-fewshot", type=non_negative,
                        help="few-shot examples per prompt (default 0; MIBE draws them from training records)")
    add_extractor_argument(parser)
    parser.add_argument("--log-samples", action="store_true",
                        help="also write samples_<task>.jsonl with prompts, generations and records (may be "
                             "patient text; what `melama eval rescore` reads)")
    chat = parser.add_mutually_exclusive_group()
    chat.add_argument("--chat-template", metavar="NAME|FILE",
                      help="prompts in this instruction-tuning template: me-llama, llama2-chat, hf (the model's "
                           "own) or a Jinja file (default: the model's own template if its folder carries one, "
                           "else plain)")
    chat.add_argument("--chat", dest="chat", action="store_true", default=None,
                      help="chat prompts: the model's own template, or Me-LLaMA's wrapper ('Human: ... "
                           "Assistant:') for a model without one")
    chat.add_argument("--no-chat", dest="chat", action="store_false",
                      help="plain prompts (the record's query), even for a model with a chat template")
    return parser


@contextlib.contextmanager
def sigterm_interrupts():
    """SIGTERM (a scheduler's stop, `kill`) ends the run as Ctrl-C does: what it created is removed (the
    temporary export under --out, a new --out) and nothing that looks like results is left."""
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["rescore"]:
        from melama_mcore.eval.rescore import main as rescore_main

        return rescore_main(argv[1:])
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    options = EvalOptions(model=args.model, tasks=args.tasks, out=args.out, adapter=args.adapter,
                          data_dir=args.data_dir, backend=args.backend, limit=args.limit,
                          num_fewshot=args.num_fewshot, extractor=args.extractor, log_samples=args.log_samples,
                          chat=args.chat, chat_template=args.chat_template, tokenizer=args.tokenizer,
                          allow_tokenizer_mismatch=args.allow_tokenizer_mismatch)
    with sigterm_interrupts():
        evaluate(options)
    print((options.out / "results.md").read_text(encoding="utf-8"), end="")
    log.info("wrote %s", options.out / "results.json")
    return 0


if __name__ == "__main__":
    from melama_mcore.cli import run_main

    sys.exit(run_main(main, sys.argv[1:]))

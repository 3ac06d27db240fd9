"""
Modality switching: what stage 3 (the paper's modality-switching instruction tuning, MosIT) buys on the toy world,
whether its dialogues matter, and whether the stage order matters.

The paper (NExT-GPT, sec. 5) says that aligning the encoding and decoding sides (stages 1, 2) is not enough for the
model to follow instructions, so stage 3 tunes LoRA and both projections on instruction data; and that the usual
single-turn 'Text+X -> Text' and 'Text -> Text+X' data do not teach multi-turn dialogues that switch modalities, so it
curates MosIT (5K dialogues), which the abstract credits with "complex cross-modal semantic understanding and content
generation". Its maintainers report having run the stages in the order 1, 3, 2 (NExT-GPT/NExT-GPT issue #17).

    python experiments/instruction_tuning.py           # the default size on out/toy, about 54 minutes (see below)
    python experiments/instruction_tuning.py --small   # every variant's wiring in about a minute

The variants, per seed:
    no stage 3     stages 1, 2 only
    single-turn    stage 3 on the records of t2x.json and instruct.json with one human turn (the several-output
                   replies stay; the 2- and 3-turn dialogues go), for as many steps as the full mix
    dialogue mix   stage 3 on the recipe's data: single turns, several outputs, dialogues of 2 and 3 turns
    order 1, 3, 2  stage 3 (full mix) straight after stage 1, then stage 2
They differ only in that: the same world, seeds, learning rates, batch and stage-3 steps. Stage 1 runs once per seed
and stage 2 once more for the order 1, 3, 2; the three stage-3 runs start from those deltas (--delta), and every run
reads one features folder, prepared before any run is timed, so nothing two variants share is trained or computed
twice. The decoders are frozen and the same for all, so the eval reports, beside each task's accuracy, each dialogue
turn's and whether the reply's text is exactly its captions (an LLM failure, not a decoder one).

The default size is the recipe's (ToyConfig(), one seed) but for stage 3: 3 epochs instead of 12, so that all fits an
hour: about 54 minutes on 2 cores, from the recipe's stage times (stage 1 219 s, stage 2 646 s and run twice, stage 3
0.13 s a step) and its eval (these 6 tasks take about 270 s a variant).
"""

import json
import os
from dataclasses import replace

import lab

import toy

NAME = "instruction_tuning"
TASKS = ["image -> text", "text -> image",  # a single-turn task of each kind: understanding, generation
         "text -> image + audio (rule)", "text -> video + image",  # several outputs in one reply
         "dialogue: image, video, audio", "dialogue: audio, image"]  # later turns see the model's own replies
SHORT = {"image -> text": "image->text", "text -> image": "text->image",  # the table's column names
         "text -> image + audio (rule)": "text->image+audio", "text -> video + image": "text->video+image",
         "dialogue: image, video, audio": "dialogue i,v,a", "dialogue: audio, image": "dialogue a,i"}
STAGE3_EPOCHS = 3  # the default size's (the recipe's 12 would not fit an hour three times over)
SMALL = dict(stage_epochs=(1, 1, 1), eval_n=1)  # --small: at most one pass per stage, one prompt per task
SMALL_STEPS = {1: [], 2: ["--max_steps=8"], 3: ["--max_steps=24"]}  # --small: stage 2's denoising is the slow step


def single_turn_data(world, folder):
    """The world's stage-3 files with only the records of one human turn -> train.py's --data (comma-separated)."""
    paths = []
    for name in ("t2x.json", "instruct.json"):
        with open(os.path.join(world, "data", name)) as f:
            records = json.load(f)
        # t2x.json has "conversation" (legacy), instruct.json "conversations" (the new code): both lists of turns
        keep = [r for r in records if sum(t["from"] == "human" for t in r.get("conversations", r.get("conversation")))
                == 1]
        paths.append(os.path.join(folder, name))
        toy.dump(paths[-1], keep)
        print(f"{name}: {len(keep)} of {len(records)} records have one human turn", flush=True)
    return ",".join(paths)


def delta(cfg, stage):
    return f"--delta={toy.latest(cfg, stage)}/nextgpt.safetensors"


def scores(cfg, ckpt, seconds):
    """Evaluate ckpt on TASKS -> {column: number}: accuracy per task, per dialogue turn, reply caption exact, and the
    training seconds of every stage the checkpoint went through."""
    acc = toy.evaluate(cfg, ckpt, tasks=TASKS)
    with open(os.path.join(cfg.out, "eval.json")) as f:
        ev = json.load(f)
    row = {SHORT[t]: acc[t] for t in TASKS}
    for t, turns in ev["turns"].items():
        row.update({f"{SHORT[t]} turn {j + 1}": a for j, a in enumerate(turns)})
    # understanding's reply exact is its accuracy; with outputs it tells a wrong text from a wrong picture
    row.update({f"reply exact {SHORT[t]}": ev["reply"][t] for t in TASKS if t != "image -> text"})
    row["train s"] = float(sum(seconds))
    return row


def run_seed(base, args, seed, single, more):
    """Every variant of one seed -> {variant: {column: number}}. more: {stage: [train.py args]} of every run."""
    shared = lab.variant(base, args, "shared", seed)
    s12 = toy.run_stages(shared, order=(1, 2), extra=more)
    # the full mix first: its step count is the single-turn run's too, so the two differ only in their data
    mix = lab.variant(base, args, "dialogue_mix", seed)
    s3 = toy.run_stages(mix, order=(3,), extra={3: [delta(shared, 2)] + more[3]})
    one = lab.variant(base, args, "single_turn", seed)
    world_data = os.path.join(base.world, "data")  # media names in the filtered copies resolve here
    s3_one = toy.run_stages(one, order=(3,), extra={3: [delta(shared, 2)] + more[3] + [
        f"--data={single}", f"--media_dir={world_data}", f"--max_steps={s3[3]['steps']}"]})
    # the maintainers' order: stage 3 from stage 1's delta, then stage 2 from stage 3's (run_stages chains them)
    order = lab.variant(base, args, "order_132", seed)
    s32 = toy.run_stages(order, order=(3, 2), extra={3: [delta(shared, 1)] + more[3], 2: more[2]})
    t = lambda losses, *stages: [losses[k]["seconds"] for k in stages]  # noqa: E731
    return {
        "no stage 3 (1, 2)": scores(lab.variant(base, args, "no_stage3", seed), toy.latest(shared, 2),
                                    t(s12, 1, 2)),
        "single-turn stage 3 (1, 2, 3)": scores(one, toy.latest(one, 3), t(s12, 1, 2) + t(s3_one, 3)),
        "dialogue mix stage 3 (1, 2, 3)": scores(mix, toy.latest(mix, 3), t(s12, 1, 2) + t(s3, 3)),
        "dialogue mix, order 1, 3, 2": scores(order, toy.latest(order, 2), t(s12, 1) + t(s32, 3, 2)),
    }


def main():
    args = lab.parse(lab.parser(__doc__))
    base = lab.setup(args, NAME, seeds=[0])
    e1, e2, _ = base.stage_epochs
    base = replace(base, **SMALL) if args.small else replace(base, stage_epochs=(e1, e2, STAGE3_EPOCHS))
    single = single_turn_data(base.world, os.path.join(args.out, "single_turn_data"))
    caps = SMALL_STEPS if args.small else {1: [], 2: [], 3: []}
    more = {stage: [lab.features(args)] + caps[stage] for stage in caps}  # one features folder for every run
    lab.prepare(base, (1, 2, 3), more)  # before any run is timed
    rows = {}
    for seed in args.seeds:
        for variant, row in run_seed(base, args, seed, single, more).items():
            lab.add(rows, variant, row)
    columns = list(next(iter(rows.values())))
    notes = (f"{len(args.seeds)} seed(s) {args.seeds}, {base.eval_n} held-out prompts per task (drawn from each "
             f"seed: toy.eval_cases), stage epochs {base.stage_epochs} (the single-turn run: as many steps as the "
             "full mix's). 'turn k': the share of dialogues whose k-th turn is right; 'reply exact': the reply's text "
             "is exactly its captions; 'train s': the seconds of every stage the checkpoint went through (a shared "
             "stage counted in each variant that uses it, though it ran once).")
    lab.report(args, NAME, rows, columns, notes=notes)


if __name__ == "__main__":
    main()

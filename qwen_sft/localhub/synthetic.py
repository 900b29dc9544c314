"""Synthetic sources in the three hub schemas (plus a report file), shaped like the real datasets, for the mixing
benchmark: SlimOrca conversations with the real system prompts, PubMedQA pqa_labeled at its real size (1,000 rows),
StackExchange questions with 2-5 HTML answers (code blocks, lists, links, entities), about a quarter of them
outside the three keyword domains. Lengths vary log-normally like the originals; duplicates and over-long rows
occur, so the filters do real work.
"""

import json
import math
import random
import time
from pathlib import Path

SYSTEM_PROMPTS = [
    "",
    "You are an AI assistant. User will you give you a task. Your goal is to complete the task as faithfully as you "
    "can. While performing the task think step-by-step and justify your steps.",
    "You are a helpful assistant, who always provide explanation. Think like you are answering to a five year old.",
    "You are an AI assistant that follows instruction extremely well. Help as much as you can.",
    "You are an AI assistant. You will be given a task. You must generate a detailed and long answer.",
    "You are a teacher. Given a task, you explain in simple steps what the task is asking, any guidelines it "
    "provides and how to use those guidelines to find an answer.",
    "Explain how you used the definition to come up with the answer.",
]

DOMAINS = {
    "ai": {
        "topics": ["a transformer language model", "a convolutional neural network", "LoRA fine-tuning of an LLM",
                   "a reinforcement learning agent", "an image classification model", "a speech recognition model",
                   "knowledge distillation", "a diffusion model", "a BERT text classifier", "an LSTM forecaster",
                   "object detection with YOLO", "a GAN for data augmentation", "gradient descent with momentum",
                   "a PyTorch training loop", "a TensorFlow Keras model", "hyperparameter search"],
        "metrics": ["validation loss", "accuracy", "F1 score", "perplexity", "BLEU score", "mean average precision",
                    "training throughput", "GPU memory use"],
        "tools": ["PyTorch", "TensorFlow", "Keras", "scikit-learn", "Hugging Face Transformers", "JAX"],
        "code": ["model.train()\nfor x, y in loader:\n    loss = criterion(model(x), y)\n    loss.backward()\n"
                 "    optimizer.step()\n    optimizer.zero_grad()",
                 "scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=100)",
                 "model.compile(optimizer='adam', loss='sparse_categorical_crossentropy', metrics=['accuracy'])"],
    },
    "ic": {
        "topics": ["a 28 nm CMOS standard cell library", "an FPGA design in Verilog", "a phase-locked loop",
                   "static timing analysis of an ASIC", "an SRAM macro", "clock domain crossing logic",
                   "a low-dropout regulator", "a power MOSFET gate driver", "an ASIC tape-out checklist",
                   "a SystemVerilog testbench", "a VHDL state machine", "an op-amp integrator",
                   "place and route of a small SoC", "wafer-level test of integrated circuits",
                   "flip-flop metastability", "DRC and LVS clean-up"],
        "metrics": ["setup slack", "hold slack", "leakage current", "die area", "power consumption",
                    "maximum clock frequency", "phase noise", "yield"],
        "tools": ["Vivado", "Quartus", "Cadence Virtuoso", "Synopsys Design Compiler", "OpenROAD", "ngspice"],
        "code": ["always @(posedge clk or negedge rst_n)\n  if (!rst_n) q <= 1'b0;\n  else q <= d;",
                 "create_clock -name clk -period 2.5 [get_ports clk]\nset_input_delay 0.4 -clock clk [all_inputs]",
                 "assign sum = a ^ b ^ cin;\nassign cout = (a & b) | (cin & (a ^ b));"],
    },
    "bio": {
        "topics": ["CRISPR gene editing", "a randomized clinical trial", "protein structure prediction",
                   "ECG signal denoising", "tumor segmentation in MRI", "a glucose biosensor",
                   "gene expression analysis with RNA-seq", "antibody affinity maturation", "EEG seizure detection",
                   "bacteria growth curves", "stem cell differentiation", "biomarker discovery in cancer",
                   "DNA sequencing error rates", "vaccine immune response", "enzyme kinetics",
                   "medical imaging registration"],
        "metrics": ["sensitivity", "specificity", "hazard ratio", "p-value", "signal-to-noise ratio",
                    "area under the ROC curve", "fold change", "dice coefficient"],
        "tools": ["Bioconductor", "BLAST", "ImageJ", "MNE-Python", "PyMOL", "GATK"],
        "code": ["dds <- DESeq(dds)\nres <- results(dds, alpha = 0.05)",
                 "from Bio.Seq import Seq\nprint(Seq('ATGGCC').translate())",
                 "raw.filter(l_freq=0.5, h_freq=40.0)\nepochs = mne.Epochs(raw, events, tmin=-0.2, tmax=0.8)"],
    },
    "general": {
        "topics": ["a Python dictionary comprehension", "a SQL left join", "git rebase", "a REST API in Flask",
                   "CSS flexbox layout", "Linux file permissions", "a Bash for loop", "Excel pivot tables",
                   "a JavaScript promise chain", "a Docker compose file", "regular expressions in Java",
                   "a C pointer to pointer", "unit tests with pytest", "a Rust borrow checker error",
                   "Kubernetes liveness probes", "a LaTeX table"],
        "metrics": ["run time", "memory use", "response time", "build time", "page load time", "error count",
                    "CPU load", "disk usage"],
        "tools": ["Python", "PostgreSQL", "git", "Docker", "Node.js", "Visual Studio Code"],
        "code": ["for f in *.log; do\n  gzip \"$f\"\ndone",
                 "SELECT o.id, c.name FROM orders o LEFT JOIN customers c ON c.id = o.customer_id;",
                 "squares = {n: n * n for n in range(10) if n % 2 == 0}"],
    },
}
SE_OFF_TOPIC_SHARE = 0.25  # StackExchange questions that match no keyword domain

SENTENCES = [
    "I am working with {topic} and the {metric} is much worse than I expected.",
    "After I changed the configuration the {metric} dropped by about {pct} percent.",
    "The documentation of {tool} does not say what happens in this case.",
    "I tried three different settings, but none of them changed the {metric} in a measurable way.",
    "My colleague suggested that the problem comes from the way {topic} is initialised.",
    "The same setup worked last month, before we upgraded {tool} to the latest release.",
    "Is there a standard way to check whether {topic} is configured correctly?",
    "I measured the {metric} on {n} separate runs and the variance is large.",
    "It looks like the issue only appears when the input is larger than {n} items.",
    "Any pointers to papers or documentation about {topic} would be appreciated.",
    "I would rather not rewrite everything, so a small change would be ideal.",
    "Here is the smallest example I could make that still shows the behaviour.",
]
ANSWER_SENTENCES = [
    "The behaviour you see is expected: {topic} is sensitive to the order of operations.",
    "Check the {metric} first with a much smaller input; if it is still off, the setup is wrong.",
    "In {tool} this is controlled by a single option that is off by default.",
    "A common mistake is to measure the {metric} before the warm-up has finished.",
    "You can verify this by logging the intermediate values after every step.",
    "I ran into the same thing and fixing the initialisation solved it for me.",
    "The variance you measured is normal for {n} runs; report the median instead of the mean.",
    "Splitting the problem into two stages makes both of them much easier to debug.",
    "This is covered in the official documentation under the section on {topic}.",
    "Keep in mind that the default settings changed between the last two releases.",
]
ENTITY_PHRASES = ["a &lt; b &amp;&amp; b &gt; c", "&quot;quoted&quot; text", "R&amp;D budget", "x&nbsp;=&nbsp;1",
                  "caf&eacute; &#8212; &#x2019;s"]

REPORT_INSTRUCTIONS = [
    ("总结以下实验报告的主要结论", "zh"), ("Summarise the key findings of this lab report", "en"),
    ("分析以下测试报告中的风险点并给出改进建议", "zh"), ("List the open issues in the following status report", "en"),
]
REPORT_SUBJECTS = {
    "zh": ["LoRA 微调实验", "28 纳米工艺 SRAM 测试", "心电信号滤波算法", "FPGA 图像处理流水线", "蛋白质表达纯化",
           "大模型推理延迟优化", "锁相环抖动测量", "血糖传感器标定"],
    "en": ["the LoRA fine-tuning run", "the 28 nm SRAM test chip", "the ECG filter study", "the FPGA video pipeline",
           "the protein purification batch", "the LLM serving latency work", "the PLL jitter measurement",
           "the glucose sensor calibration"],
}


def _length(rng: random.Random, median: int, spread: float = 0.6) -> int:
    """A log-normal count, like the lengths of real questions and answers."""
    return max(1, int(rng.lognormvariate(math.log(median), spread)))


def _fill(rng: random.Random, template: str, domain: dict) -> str:
    return template.format(topic=rng.choice(domain["topics"]), metric=rng.choice(domain["metrics"]),
                           tool=rng.choice(domain["tools"]), n=rng.randint(2, 500), pct=rng.randint(2, 60))


def _paragraph(rng: random.Random, pool: list[str], domain: dict, sentences: int) -> str:
    return " ".join(_fill(rng, rng.choice(pool), domain) for _ in range(sentences))


def _se_html(rng: random.Random, pool: list[str], domain: dict, median_sentences: int) -> str:
    parts = [f"<p>{_paragraph(rng, pool, domain, _length(rng, median_sentences))}</p>"]
    if rng.random() < 0.5:
        parts.append(f"<pre><code>{rng.choice(domain['code']).replace('<', '&lt;').replace('>', '&gt;')}</code></pre>")
    if rng.random() < 0.3:
        items = "".join(f"<li>{_fill(rng, rng.choice(pool), domain)}</li>" for _ in range(rng.randint(2, 4)))
        parts.append(f"<ul>{items}</ul>")
    if rng.random() < 0.3:
        parts.append(f'<p>See <a href="https://example.org/{rng.randint(1, 10**6)}">this note</a> on '
                     f"<em>{rng.choice(ENTITY_PHRASES)}</em>.</p>")
    parts.append(f"<p>{_paragraph(rng, pool, domain, _length(rng, 2, 0.5))}</p>")
    return "\n\n".join(parts)


def stackexchange_row(rng: random.Random, qid: int, domain_weights: dict[str, float]) -> dict:
    name = rng.choices(list(domain_weights), weights=list(domain_weights.values()))[0]
    domain = DOMAINS[name]
    answers = []
    for index in range(rng.randint(2, 5)):  # the dataset keeps questions with at least two answers
        answers.append({
            "answer_id": qid * 10 + index,
            "author": f"user{rng.randint(1, 10**6)}",
            "pm_score": rng.randint(-1, 12),
            "selected": index == 0 and rng.random() < 0.4,
            "text": _se_html(rng, ANSWER_SENTENCES, domain, 5),
        })
    return {
        "qid": qid,
        "question": _se_html(rng, SENTENCES, domain, 5),
        "answers": answers,
        "date": f"20{rng.randint(10, 23)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
        "metadata": [f"https://{name}.stackexchange.com/questions/{qid}", f"https://{name}.stackexchange.com",
                     f"https://{name}.stackexchange.com/users/{rng.randint(1, 10**6)}"],
    }


def _orca_task(rng: random.Random) -> tuple[str, str]:
    kind = rng.randrange(4)
    domain = DOMAINS[rng.choice(list(DOMAINS))]
    if kind == 0:
        apples, given, price = rng.randint(50, 9000), rng.randint(1, 40), rng.randint(2, 99)
        left = apples - given
        return (f"Solve this problem: A shop has {apples} apples and sells {given} of them. Each remaining apple "
                f"costs {price} dollars. How much are the remaining apples worth?",
                f"Step 1: apples left = {apples} - {given} = {left}.\nStep 2: value = {left} x {price} = "
                f"{left * price} dollars.\nThe remaining apples are worth {left * price} dollars.")
    if kind == 1:
        text = _paragraph(rng, SENTENCES, domain, _length(rng, 4))
        mood = rng.choice(["positive", "negative"])
        review = f"{text} Overall the experience was {'great' if mood == 'positive' else 'disappointing'}."
        return (f"Review: {review}\nIs this review positive or negative?",
                f"The review is {mood}. The last sentence states the overall impression directly, and the rest of "
                f"the text describes the details that led to it.")
    if kind == 2:
        passage = _paragraph(rng, ANSWER_SENTENCES, domain, _length(rng, 6))
        return (f"Summarize the following passage in one or two sentences.\n\n{passage}",
                f"The passage explains how to approach {rng.choice(domain['topics'])}: "
                f"{_paragraph(rng, ANSWER_SENTENCES, domain, 2)}")
    words = rng.sample(["river", "lantern", "harvest", "engine", "library", "mountain", "signal", "garden"], 3)
    return (f"Generate a sentence that includes all the following words: {', '.join(words)}.",
            f"Near the {words[0]}, the old {words[1]} lit the path to the {words[2]} every evening. "
            f"{_paragraph(rng, ANSWER_SENTENCES, domain, _length(rng, 2))}")


def slimorca_row(rng: random.Random) -> dict:
    question, answer = _orca_task(rng)
    turns = [{"from": "system", "value": rng.choice(SYSTEM_PROMPTS), "weight": None},
             {"from": "human", "value": question, "weight": 0.0},
             {"from": "gpt", "value": answer, "weight": 1.0}]
    return {"conversations": turns}


def pubmedqa_row(rng: random.Random, pubid: int) -> dict:
    domain = DOMAINS["bio"]
    topic = rng.choice(domain["topics"])
    metric = rng.choice(domain["metrics"])
    labels = ["BACKGROUND", "METHODS", "RESULTS"] + (["CONCLUSIONS"] if rng.random() < 0.3 else [])
    contexts = [
        f"{topic.capitalize()} is widely studied, yet its effect on {metric} in routine practice is unclear. "
        + _paragraph(rng, SENTENCES, domain, _length(rng, 2)),
        f"We enrolled {rng.randint(20, 900)} patients across {rng.randint(1, 12)} centres and compared {metric} "
        f"between groups. " + _paragraph(rng, SENTENCES, domain, _length(rng, 2)),
        f"The {metric} changed from {rng.uniform(0.1, 0.9):.2f} to {rng.uniform(0.1, 0.9):.2f} "
        f"(p = {rng.uniform(0.001, 0.2):.3f}). " + _paragraph(rng, ANSWER_SENTENCES, domain, _length(rng, 2)),
        "These findings should be confirmed in a larger prospective cohort.",
    ][: len(labels)]
    decision = rng.choices(["yes", "no", "maybe"], weights=[55, 34, 11])[0]
    verdict = {"yes": "improves", "no": "does not improve", "maybe": "may improve"}[decision]
    return {
        "pubid": pubid,
        "question": f"Does {topic} improve {metric} in clinical practice?",
        "context": {"contexts": contexts, "labels": labels,
                    "meshes": rng.sample(["Humans", "Adult", "Female", "Male", "Prospective Studies", "Biomarkers",
                                          "Signal Processing, Computer-Assisted", "Gene Editing"], 3)},
        "long_answer": f"In this cohort, {topic} {verdict} {metric}. "
                       + _paragraph(rng, ANSWER_SENTENCES, domain, _length(rng, 2)),
        "final_decision": decision,
    }


def report_row(rng: random.Random) -> dict:
    instruction, language = rng.choice(REPORT_INSTRUCTIONS)
    subject = rng.choice(REPORT_SUBJECTS[language])
    value, target = rng.randint(50, 99), rng.randint(80, 99)
    if language == "zh":
        report = (f"{subject}第 {rng.randint(1, 40)} 周报告：本周完成 {rng.randint(3, 12)} 组测试，关键指标为 {value}%，"
                  f"目标为 {target}%。主要问题是样本数量不足以及测试环境温度波动。")
        answer = (f"结论：{subject}的关键指标为 {value}%，{'已达到' if value >= target else '尚未达到'}目标 {target}%。"
                  f"风险：样本量不足、环境温度波动。建议：增加样本并固定测试条件后复测。")
    else:
        report = (f"Week {rng.randint(1, 40)} report on {subject}: {rng.randint(3, 12)} test runs finished, the key "
                  f"metric reached {value}% against a target of {target}%. Sample size and lab temperature drift "
                  f"remain the main problems.")
        answer = (f"Conclusion: {subject} reached {value}%, {'meeting' if value >= target else 'below'} the "
                  f"{target}% target. Risks: small sample size, temperature drift. Next step: repeat the runs with "
                  f"more samples under fixed conditions.")
    return {"instruction": instruction, "input": report, "output": answer}


def _write_jsonl(path: Path, rows) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_sources(folder: Path, total: int, ratios: dict, headroom: float, seed: int) -> dict[str, Path]:
    """Write the four inputs sized for a `total`-row mix; reuse files already there."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    pubmed_rows = min(1000, int(total * ratios["bio"] * headroom) + 1)  # pqa_labeled has 1,000 rows
    # On-topic questions in proportion to what each domain still needs from StackExchange.
    domain_needs = {"ai": total * ratios["ai"], "ic": total * ratios["ic"], "bio": total * ratios["bio"] - pubmed_rows}
    on_topic = sum(domain_needs.values())
    domain_weights = {name: (1 - SE_OFF_TOPIC_SHARE) * need / on_topic for name, need in domain_needs.items()}
    domain_weights["general"] = SE_OFF_TOPIC_SHARE
    plan = {
        "my_reports": (folder / "my_reports.jsonl", int(total * ratios["my_reports"] * headroom) + 1,
                       lambda i: report_row(rng)),
        "orca": (folder / "slimorca.jsonl", int(total * ratios["orca"] * headroom) + 1, lambda i: slimorca_row(rng)),
        "pubmed": (folder / "pubmedqa_pqa_labeled.jsonl", pubmed_rows, lambda i: pubmedqa_row(rng, 10_000_000 + i)),
        "stackexchange": (folder / "stack_exchange_preferences.jsonl",
                          int(on_topic / (1 - SE_OFF_TOPIC_SHARE) * headroom) + 1,
                          lambda i: stackexchange_row(rng, i, domain_weights)),
    }
    for name, (path, rows, make) in plan.items():
        if path.exists():
            print(f"reusing {path}")
            continue
        started = time.perf_counter()
        _write_jsonl(path, (make(i) for i in range(rows)))
        print(f"wrote {rows:,} {name} rows to {path} ({path.stat().st_size / 2**20:,.0f} MiB) "
              f"in {time.perf_counter() - started:.0f} s")
    return {name: path for name, (path, _, _) in plan.items()}

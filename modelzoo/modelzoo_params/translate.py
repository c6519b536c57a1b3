"""Model Zoo params (either layout) -> this toolkit's params, by the rules of rules.py."""

from __future__ import annotations

from dataclasses import dataclass, field

from modelzoo.config import CODON_VOCAB_SIZE, SCHEDULE_PHASES, DataInput, ModelConfig, OptimizerConfig, \
    RunConfig, SparsityConfig, Problem
from modelzoo.modelzoo_params.rules import ARCHITECTURES, BERT_ONLY, DROPOUTS, RULES, SCHEDULER_NAMES, \
    Refused, Rule, Several, load_states

# Our sections, by the Model Zoo part whose keys they take ('input': train_input and eval_input).
NATIVE = {"input": DataInput, "model": ModelConfig, "optimizer": OptimizerConfig, "runconfig": RunConfig,
          "sparsity": SparsityConfig}
SECTIONED = ("train_input", "eval_input", "model", "optimizer", "runconfig", "sparsity")


@dataclass
class Translation:
    """A Model Zoo file turned into our params: ``params`` (a native dict), the problems found
    (``Problem`` with the file's own key paths), ``origin`` (our key path -> the file's key path,
    so a later schema error names the key the user wrote) and the notes for the run log."""
    source: str
    params: dict = field(default_factory=lambda: {"model": {}, "runconfig": {}})
    problems: list = field(default_factory=list)
    origin: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)
    ignored: dict = field(default_factory=dict)  # the file's path of each noted key -> why it is ignored
    model_name: str | None = None
    blocked: set = field(default_factory=set)

    def set(self, ours: str, value, theirs: tuple) -> None:
        section, _, key = ours.partition(".")
        self.params.setdefault(section, {})[key] = value
        self.origin[(section, key)] = theirs
        self.origin.setdefault((section,), theirs[:-1])

    def ignore(self, theirs: tuple, why: str) -> None:
        if theirs not in self.ignored:
            self.ignored[theirs] = why

    def refuse(self, theirs: tuple, message: str, ours: str = "") -> None:
        """``ours``: the key of ours the refused one would have set; the schema's complaint that it
        is missing would repeat this one, so it is not reported."""
        self.problems.append(Problem(theirs, message))
        if ours:
            self.blocked.add(tuple(ours.split(".")))


# ------------------------------------------------------------------------ detection and hints

def is_modelzoo_file(raw: dict) -> bool:
    if "trainer" in raw:
        return True
    model = raw.get("model")
    if isinstance(model, dict) and "name" not in model:
        return True
    for section in SECTIONED:
        part = _rule_section(section)
        values = raw.get(section)
        if isinstance(values, dict) and any(_modelzoo_only(part, key) for key in values):
            return True
    return False


def _rule_section(section: str) -> str:
    return "input" if section in ("train_input", "eval_input") else section


def _modelzoo_only(part: str, key: str) -> bool:
    return (part, key) in RULES and key not in NATIVE[part].model_fields


def hint_for(loc: list[str], modelzoo: bool = False) -> str | None:
    """For an unknown key that the Model Zoo knows elsewhere: the key it maps to (in a native
    file) or the Model Zoo section it belongs in (in a Model Zoo file); never a look-alike. None
    for keys the Model Zoo does not know either."""
    if not loc:
        return None
    key = loc[-1]
    part = _rule_section(loc[-2]) if len(loc) >= 2 else ""
    candidates = [((p, k), r) for (p, k), r in RULES.items() if k == key]
    if not candidates:
        return None
    here = [c for c in candidates if c[0][0] == part] or candidates
    (p, _), rule = here[0]
    where = "train_input" if p == "input" else p
    if modelzoo:
        return f"it belongs in {where} ({where}.{key}: {rule.fate}, docs/modelzoo.md)"
    if rule.fate == "mapped" and rule.ours:
        targets = [o.strip() if "." in o else f"{where}.{o.strip()}" for o in rule.ours.split(",")]
        return f"did you mean {', '.join(targets)}? (the Model Zoo's {where}.{key})"
    return f"the Model Zoo's {where}.{key} ({rule.fate}: {rule.meaning or 'docs/modelzoo.md'})"


# ------------------------------------------------------------------------ translation

def translate(raw: dict, source: str) -> Translation:
    t = Translation(source)
    sections = _trainer_sections(raw, t) if "trainer" in raw else _sectioned(raw, t)
    model = sections.get("model")
    name = t.model_name = _model_name(model[0], model[1], t) if model else None
    for section, (values, path) in sections.items():
        t.origin[(section,)] = path  # what a whole-section complaint names
        if section in ("train_input", "eval_input"):
            _translate_input(section, values, path, t)
        elif section == "model":
            _translate_model(values, path, name, t)
        else:
            _translate_keys(section, section, _items(values, path), t)
    t.notes = list(dict.fromkeys(t.notes))  # a setting given twice (model and precision) is noted once
    if t.ignored:
        t.notes.insert(0, "Model Zoo keys ignored (see docs/modelzoo.md): " + ", ".join(".".join(p) for p in t.ignored))
    return t


def _sectioned(raw: dict, t: Translation) -> dict:
    sections = {}
    for key, values in _string_keys(raw):
        if key in SECTIONED:
            if not isinstance(values, dict):
                t.refuse((key,), "expected a mapping")
                continue
            sections[key] = (values, (key,))
        else:
            t.refuse((key,), f"unknown section; a Model Zoo file has {', '.join(SECTIONED)} (or trainer:)")
    return sections


def _trainer_sections(raw: dict, t: Translation) -> dict:
    """The 2.4 layout as the sectioned one: each part with the path it has in the file."""
    for key, _ in _string_keys(raw):
        if key != "trainer":
            t.refuse((key,), "unknown key beside trainer: (a file has one layout)")
    trainer = raw["trainer"]
    if isinstance(trainer, list):
        t.refuse(("trainer",), "a list of trainers (multi-phase runs) is not supported; give one trainer")
        return {}
    if not isinstance(trainer, dict):
        t.refuse(("trainer",), "expected a mapping with init and fit")
        return {}
    sections: dict = {"runconfig": ({}, ("trainer", "init"))}
    parts = {}
    for key, value in _string_keys(trainer):
        rule = RULES.get(("trainer", key))
        if rule is None:
            t.refuse(("trainer", key), "unknown key; a trainer has init, fit, validate, validate_all")
        elif rule.fate == "noted":
            parts[key] = value
        elif not isinstance(value, dict):
            t.refuse(("trainer", key), "expected a mapping")
        else:
            parts[key] = value
    init, fit = parts.get("init", {}), parts.get("fit", {})
    runconfig, optimizer = {}, {}
    for key, value in _string_keys(init):
        path = ("trainer", "init", key)
        rule = RULES.get(("trainer.init", key))
        if rule is None:
            _unknown(t, path, "trainer.init")
        elif rule.fate == "noted":
            t.ignore(path, rule.meaning)
        elif key == "model":
            sections["model"] = (value, path) if isinstance(value, dict) else t.refuse(path, "expected a mapping")
        elif key == "sparsity":
            sections["sparsity"] = (value, path) if isinstance(value, dict) else t.refuse(path, "expected a mapping")
        elif key == "optimizer":
            optimizer.update(_trainer_optimizer(value, path, t))
        elif key == "schedulers":
            phases = _trainer_schedulers(value, path, t)
            if phases is None:
                t.blocked.add(("optimizer", "learning_rate"))  # refused: not "missing" as well
            optimizer["learning_rate"] = (phases, path)
        elif key == "callbacks":
            _callbacks(value, path, t, runconfig)
        elif key in ("precision", "loop", "checkpoint", "logging"):
            _trainer_part(key, value, path, t, runconfig, optimizer)
        else:  # model_dir, seed
            runconfig[rule.ours.split(".")[1]] = (value, path)
    if optimizer:
        sections["optimizer"] = (optimizer, ("trainer", "init", "optimizer"))
    sections["runconfig"] = (runconfig, ("trainer", "init"))
    for key, value in _string_keys(fit):
        path = ("trainer", "fit", key)
        if key == "ckpt_path":
            runconfig["checkpoint_path"] = (value, path)
        elif key in ("train_dataloader", "val_dataloader"):
            section = "train_input" if key == "train_dataloader" else "eval_input"
            sections[section] = _one_loader(value, path, t)
        else:
            _unknown(t, path, "trainer.fit")
    if "eval_input" not in sections:
        for part, key in (("validate", "val_dataloader"), ("validate_all", "val_dataloaders")):
            loader = parts.get(part, {}).get(key) if isinstance(parts.get(part), dict) else None
            if loader is not None:
                sections["eval_input"] = _one_loader(loader, ("trainer", part, key), t)
                break
    for part in ("validate", "validate_all"):
        if part in parts:
            t.ignore(("trainer", part), RULES[("trainer", part)].meaning)
    return {k: v for k, v in sections.items() if v is not None}


def _one_loader(value, path: tuple, t: Translation):
    if isinstance(value, list):
        if len(value) != 1:
            t.refuse(path, f"{len(value)} dataloaders: a run evaluates one eval_input")
            return None
        value, path = value[0], path + ("0",)
    if not isinstance(value, dict):
        t.refuse(path, "expected a mapping")
        return None
    return value, path


def _trainer_optimizer(value, path: tuple, t: Translation) -> dict:
    """{AdamW: {betas: ..., ...}} -> the sectioned optimizer's keys (each value with its path)."""
    if not (isinstance(value, dict) and len(value) == 1 and isinstance(next(iter(value.values())), (dict, type(None)))):
        t.refuse(path, "expected one optimizer: {AdamW: {...}}")
        return {}
    (kind, settings), = _string_keys(value)
    out = {"optimizer_type": (kind, path + (kind,))}
    for key, v in _string_keys(settings or {}):
        out[key] = (v, path + (kind, key))
    return out


def _trainer_schedulers(value, path: tuple, t: Translation):
    """[SequentialLR: {schedulers: [LinearLR: {...}, ...]}] or [LinearLR: {...}] -> 1.x phases."""
    entries = value if isinstance(value, list) else [value]
    if len(entries) != 1:
        t.refuse(path, f"{len(entries)} schedulers side by side: give one (SequentialLR for phases)")
        return None
    entry = entries[0]
    if not (isinstance(entry, dict) and len(entry) == 1):
        t.refuse(path, "expected {SchedulerName: {...}}")
        return None
    (kind, settings), = _string_keys(entry)
    if not isinstance(settings, (dict, type(None))):
        t.refuse(path + ("0", kind), "expected the scheduler's settings as a mapping")
        return None
    if kind == "SequentialLR":
        inner = (settings or {}).get("schedulers")
        if not isinstance(inner, list):
            t.refuse(path + ("0", kind), "expected schedulers: [ ... ]")
            return None
        milestones = settings.get("milestones")
        phases = []
        for item in inner:
            if not (isinstance(item, dict) and len(item) == 1 and isinstance(next(iter(item.values())),
                                                                              (dict, type(None)))):
                t.refuse(path + ("0", kind, "schedulers"), "expected {SchedulerName: {...}} phases")
                return None
            (name, s), = _string_keys(item)
            phases.append({"scheduler": SCHEDULER_NAMES.get(name, name), **(s or {})})
        lengths = [p.get("total_iters") for p in phases[:-1]]
        if milestones is not None and (not all(isinstance(n, int) for n in lengths)
                                       or milestones != [sum(lengths[:i + 1]) for i in range(len(lengths))]):
            t.refuse(path + ("0", kind, "milestones"), f"{milestones!r}: phases change where each one's total_iters "
                                                      f"ends ({lengths!r})")
            return None
        return phases
    return [{"scheduler": SCHEDULER_NAMES.get(kind, kind), **(settings or {})}]


def _callbacks(value, path: tuple, t: Translation, runconfig: dict) -> None:
    for i, item in enumerate(value if isinstance(value, list) else [value]):
        name = str(next(iter(item))) if isinstance(item, dict) and item else str(item)
        settings = item.get(name) if isinstance(item, dict) else None
        if name == "LoadCheckpointStates" and isinstance(settings, dict) and "load_checkpoint_states" in settings:
            runconfig["load_checkpoint_states"] = (load_states(settings["load_checkpoint_states"], t),
                                                   path + (str(i), name, "load_checkpoint_states"))
        else:
            t.ignore(path + (name,), "a callback with no counterpart here (gradient norms are logged anyway)")


def _trainer_part(part: str, value, path: tuple, t: Translation, runconfig: dict, optimizer: dict) -> None:
    if not isinstance(value, dict):
        t.refuse(path, "expected a mapping")
        return
    for key, v in _string_keys(value):
        key_path = path + (key,)
        rule = RULES.get((f"trainer.init.{part}", key))
        if rule is None:
            _unknown(t, key_path, f"trainer.init.{part}")
            continue
        if rule.fate != "mapped":
            _apply_unmapped(rule, key_path, t)
            continue
        section, _, ours = rule.ours.partition(".")
        if rule.convert is not None:
            try:
                v = rule.convert(v, t)
            except Refused as e:
                t.refuse(key_path, str(e))
                continue
        if section == "model":  # precision's enabled, fp16_type: converted above
            t.set(rule.ours, v, key_path)
        else:
            target = {"runconfig": runconfig, "optimizer": optimizer}[section]
            for name, value in (v.items() if isinstance(v, Several) else [(ours, v)]):
                target[name] = (value, key_path)


def _apply_unmapped(rule: Rule, path: tuple, t: Translation) -> None:
    if rule.fate == "noted":
        t.ignore(path, rule.meaning)
    else:
        t.refuse(path, f"not supported: {rule.meaning}")


def _unknown(t: Translation, path: tuple, part: str) -> None:
    """Neither a Model Zoo key of this part nor ours: where it belongs if the Model Zoo knows it,
    else the closest spelling among the keys of this part (the Model Zoo's and ours)."""
    from modelzoo.config import closest_key
    hint = hint_for(list(path), modelzoo=True)
    if hint is None:
        valid = [k for (p, k) in RULES if p == part] + list(getattr(NATIVE.get(part), "model_fields", {}))
        close = closest_key(path[-1], list(dict.fromkeys(valid)))
        hint = f"did you mean {close!r}?" if close else f"not a Model Zoo key of {part} (docs/modelzoo.md)"
    t.refuse(path, f"unknown key; {hint}")


def _string_keys(values) -> list:
    """A mapping's items with its keys as the file's text (yaml keys may be numbers); none if not a mapping."""
    return [(str(k), v) for k, v in values.items()] if isinstance(values, dict) else []


def _items(values: dict, path: tuple):
    """(key, value, the key's path in the file) of a section in either layout."""
    for key, value in _string_keys(values):
        if isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], tuple):
            yield key, value[0], value[1]
        else:
            yield key, value, path + (key,)


def _translate_keys(part: str, section: str, items, t: Translation, architecture: dict | None = None,
                    later: tuple = ()) -> None:
    """Each key of one section by its rule; keys of ours pass through unchanged. ``architecture``:
    the flags the model must have; ``later``: keys the caller translates from all of them."""
    native = NATIVE[part].model_fields
    for key, value, key_path in items:
        rule = RULES.get((part, key))
        if rule is None:
            if key in native:
                t.set(f"{section}.{key}", value, key_path)
            else:
                _unknown(t, key_path, part)
        elif rule.fate != "mapped":
            _apply_unmapped(rule, key_path, t)
        elif architecture and key in architecture:
            _check_architecture(key, value, key_path, architecture, t)
        elif key not in later:
            _translate_value(rule, section, key, value, key_path, t)


def _translate_value(rule: Rule, section: str, key: str, value, key_path: tuple, t: Translation) -> None:
    ours = rule.ours if "." in rule.ours else f"{section}.{rule.ours}"
    try:
        converted = rule.convert(value, t) if rule.convert else value
    except Refused as e:
        t.refuse(key_path, str(e), ours if rule.ours and "," not in rule.ours else "")
        return
    if isinstance(converted, Several):
        for name, v in converted.items():
            t.set(f"{section}.{name}", v, key_path)
    elif key == "learning_rate":
        _learning_rate(value, key_path, t)
    elif rule.ours:
        t.set(ours, converted, key_path)


def _check_architecture(key: str, value, key_path: tuple, architecture: dict, t: Translation) -> None:
    expected, name = architecture[key], t.model_name
    if (str(value).lower() if isinstance(expected, str) else value) != expected:
        t.refuse(key_path, f"{value!r}: {name} has {key} {expected!r} (this toolkit's {name} is that "
                           f"architecture only)")


def _learning_rate(value, path: tuple, t: Translation) -> None:
    """A number, one phase or a list of phases, in the 1.x or 2.x spelling -> our phases."""
    if value is None:
        return
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        t.set("optimizer.learning_rate", value, path)
        return
    phases = value if isinstance(value, list) else [value]
    ours = []
    for i, phase in enumerate(phases):
        phase_path = path + (str(i),) if isinstance(value, list) else path
        if not isinstance(phase, dict):
            t.refuse(phase_path, "expected a schedule phase {scheduler: ..., ...}", "optimizer.learning_rate")
            return
        try:
            ours += _phase(dict(phase))
        except Refused as e:
            t.refuse(phase_path, str(e), "optimizer.learning_rate")
            return
    t.set("optimizer.learning_rate", ours, path)


def _phase(phase: dict) -> list[dict]:
    kind = str(phase.get("scheduler", ""))
    kind = SCHEDULER_NAMES.get(kind, kind)
    kind = {"constant": "Constant", "linear": "Linear", "cosinedecay": "CosineDecay",
            "exponential": "Exponential", "polynomial": "Polynomial", "step": "Step"}.get(kind.lower(), kind)
    phase["scheduler"] = kind
    if "steps" in phase:  # the 1.x spelling of a phase's length
        phase["total_iters"] = phase.pop("steps")
    if kind == "MultiStep":
        return _multistep(phase)
    if kind == "PiecewiseConstant":
        return _piecewise(phase)
    if kind not in SCHEDULE_PHASES:
        raise Refused(f"scheduler {kind!r} is not supported; supported: {', '.join(SCHEDULE_PHASES)}, MultiStep, "
                      f"PiecewiseConstant")
    if kind == "Exponential":
        phase.setdefault("decay_steps", phase.get("total_iters"))
    if kind == "Polynomial":
        if phase.pop("cycle", False):
            raise Refused("Polynomial with cycle: true is not supported")
        if "decay_steps" in phase:
            phase["total_iters"] = phase.pop("decay_steps")
    if kind == "Linear" and "decay_steps" in phase:
        phase["total_iters"] = phase.pop("decay_steps")
    if kind == "CosineDecay" and "decay_steps" in phase:
        phase["total_iters"] = phase.pop("decay_steps")
    if "alpha" in phase:  # 1.x: the end rate as a fraction of the initial one, where no end rate is given
        alpha = phase.pop("alpha")
        if "end_learning_rate" not in phase and isinstance(alpha, (int, float)) \
                and isinstance(phase.get("initial_learning_rate"), (int, float)):
            phase["end_learning_rate"] = phase["initial_learning_rate"] * alpha
    phase.pop("disable_lr_steps_reset", None)
    return [phase]


def _multistep(phase: dict) -> list[dict]:
    lr, gamma, milestones = phase.get("initial_learning_rate"), phase.get("gamma"), phase.get("milestones")
    if not isinstance(milestones, list) or not all(isinstance(m, int) for m in milestones) \
            or milestones != sorted(milestones) or not isinstance(lr, (int, float)) or not isinstance(gamma, (int, float)):
        raise Refused("MultiStep needs initial_learning_rate, gamma and increasing integer milestones")
    edges = [0] + milestones
    out = [{"scheduler": "Constant", "learning_rate": lr * gamma ** i, "total_iters": b - a}
           for i, (a, b) in enumerate(zip(edges, edges[1:])) if b > a]
    last = {"scheduler": "Constant", "learning_rate": lr * gamma ** len(milestones)}
    if phase.get("total_iters"):
        last["total_iters"] = phase["total_iters"] - milestones[-1] if milestones else phase["total_iters"]
    return out + [last]


def _piecewise(phase: dict) -> list[dict]:
    rates, milestones = phase.get("learning_rates"), phase.get("milestones")
    if not (isinstance(rates, list) and isinstance(milestones, list) and len(rates) == len(milestones) + 1
            and all(isinstance(m, int) for m in milestones) and milestones == sorted(milestones)):
        raise Refused("PiecewiseConstant needs learning_rates (one more than milestones) and increasing milestones")
    edges = [0] + milestones
    return [{"scheduler": "Constant", "learning_rate": r, "total_iters": b - a}
            for r, a, b in zip(rates, edges, edges[1:])] + [{"scheduler": "Constant", "learning_rate": rates[-1]}]


def _translate_input(section: str, values: dict, path: tuple, t: Translation) -> None:
    """The section's keys; the settings a Model Zoo file has no key for (or may omit) follow the
    shards its data_dir names, as prepare_genomes wrote them into their manifest."""
    _translate_keys("input", section, _items(values, path), t)
    ours = t.params.get(section, {})
    data_dir = ours.get("data_dir")
    missing = [key for key in ("max_seq_length", "reading_frame", "pack_sequences") if key not in ours]
    if not missing:
        return
    if not isinstance(data_dir, str) or "\0" in data_dir:
        t.blocked.add((section, "max_seq_length"))  # no shards to read it from: data_dir is reported
        return
    from modelzoo.data.datasets import shard_settings
    from modelzoo.data.shards import manifest_fields
    fields = manifest_fields(data_dir)
    settings = shard_settings(fields) if fields is not None else {}
    if "max_seq_length" in missing and not isinstance(settings.get("max_seq_length"), int):
        t.refuse(path, f"max_sequence_length is not given and {data_dir} holds no shard manifest to read it "
                       f"from", f"{section}.max_seq_length")
        missing.remove("max_seq_length")
    taken = [key for key in missing if key in settings]
    for key in taken:
        t.set(f"{section}.{key}", settings[key], path + ("data_dir",))
    if taken:
        shown = ", ".join(f"{key} {str(settings[key]).lower()}" for key in taken)
        t.notes.append(f"{section}: {shown}, as the shards in {data_dir} were prepared (their manifest)")


def _model_name(values: dict, path: tuple, t: Translation) -> str | None:
    """Our architecture from the Model Zoo's name (2.4) or, in sectioned files, from its flags."""
    flags = {k: v for k, v, _ in _items(values, path)}
    untied = flags.get("use_untied_layer_norm") is True
    if "name" in flags:
        given = str(flags["name"]).lower()
        names = {"gpt2": "gpt2", "gpt3": "gpt2", "gptj": "gpt_neox" if untied else "gptj", "gpt_neox": "gpt_neox",
                 "gptneox": "gpt_neox", "bert": "bert", "bert/classifier": "bert"}
        if given not in names:
            t.refuse(path + ("name",), f"{flags['name']!r} is not an architecture of this toolkit (gpt2, gpt3, gptj, "
                                       f"gpt_neox, bert)", "model.name")
            return None
        return names[given]
    if str(flags.get("position_embedding_type", "learned")).lower() == "rotary":
        name = "gpt_neox" if untied else "gptj"
    else:
        name = "bert" if any(k in flags for k in BERT_ONLY) else "gpt2"
    t.notes.append(f"model.name not given (a sectioned Model Zoo file): {name}, from the model's keys")
    return name


def _translate_model(values: dict, path: tuple, name: str | None, t: Translation) -> None:
    items = list(_items(values, path))
    flags = {k: (v, p) for k, v, p in items}
    _translate_keys("model", "model", items, t, ARCHITECTURES.get(name or "", {}), (*DROPOUTS, "name", "rotary_dim"))
    if name:
        t.set("model.name", name, flags["name"][1] if "name" in flags else path)
    _dropouts(flags, t)
    if "rotary_dim" in flags:
        _rotary(flags, name, t)
    if "vocab_size" not in flags:
        t.set("model.vocab_size", CODON_VOCAB_SIZE, path)


def _dropouts(flags: dict, t: Translation) -> None:
    given = {k: v for k, v in flags.items() if k in DROPOUTS}  # in file order
    rates = [v for v, _ in given.values()]
    if any(r != rates[0] for r in rates):
        first, *rest = given.items()
        t.refuse(first[1][1], f"{', '.join(f'{k} {v}' for k, (v, _) in given.items())} differ: the models apply one "
                              f"dropout_rate to embeddings, residual branches and MLP; give them one value")
    elif rates:
        key, (value, key_path) = next(iter(given.items()))
        t.set("model.dropout_rate", value, key_path)


def _rotary(flags: dict, name: str | None, t: Translation) -> None:
    value, key_path = flags["rotary_dim"]
    if name == "gptj":
        t.set("model.rotary_dim", value, key_path)
        return
    if name != "gpt_neox":
        t.refuse(key_path, f"rotary_dim applies to rotary models (gptj, gpt_neox), not {name}")
        return
    hidden, heads = flags.get("hidden_size", (None,))[0], flags.get("num_heads", (None,))[0]
    if not (isinstance(hidden, int) and isinstance(heads, int) and heads > 0 and hidden % heads == 0):
        return  # hidden_size / num_heads are reported themselves
    head_dim = hidden // heads
    if not isinstance(value, int) or not 0 < value <= head_dim or value % 2:
        t.refuse(key_path, f"{value!r}: must be an even number in 2..head_dim ({head_dim})", "model.rotary_pct")
        return
    # int(head_dim * rotary_pct) must give back rotary_dim exactly (10 / 48 * 48 is 9.999...)
    pct = value / head_dim if int(head_dim * (value / head_dim)) == value else min(1.0, (value + 1e-9) / head_dim)
    t.set("model.rotary_pct", pct, key_path)



"""Step 1 of the mix, the plan: the checked config's buckets, their exact quotas, the sources that fill them and the reading order."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..cli import UserError
from .rows import content_byte_budget
from .schemas import REPORTS, SCHEMAS, StackExchangeSchema
from .sources import Source

RATIO_TOLERANCE = 1e-6
# The RATIOS key of the bucket that MY_REPORT_DATA_PATH fills, in each option's stage.
OPTION_A_REPORT_KEY = "reports"  # data_integration.py
OPTION_B_REPORT_KEY = "my_reports"  # data_set_generation.py


def exact_quotas(total: int, ratios: dict[str, float]) -> dict[str, int]:
    """Quotas that sum to `total` exactly, none negative (the largest remainder method): each share rounded down,
    then one more row to each of the shares with the largest fractional parts (ties: the larger share, then RATIOS
    order) until the total is reached."""
    weight = sum(ratios.values())
    exact = {key: total * ratio / weight for key, ratio in ratios.items()}
    quotas = {key: math.floor(value) for key, value in exact.items()}
    order = sorted(ratios, key=lambda key: (-(exact[key] - quotas[key]), -ratios[key], list(ratios).index(key)))
    for key in order[: total - sum(quotas.values())]:
        quotas[key] += 1
    return quotas



@dataclass
class Bucket:
    key: str
    quota: int
    sources: list[str]
    kept: int = 0

    @property
    def open(self) -> bool:
        return self.kept < self.quota



@dataclass
class MixPlan:
    buckets: dict[str, Bucket]
    sources: list[Source]  # in reading order, only those some bucket with a quota needs
    feeds: dict[str, list[str]]  # source key -> the buckets it fills
    keyword_split: set[str]  # source keys whose rows are routed by KEYWORDS
    keywords: dict[str, list[str]]


def _check_ratios(ratios) -> list[str]:
    if not isinstance(ratios, dict) or not ratios:
        return ["RATIOS must name at least one source, e.g. --ratios reports=0.2,orca=0.8"]
    errors = [
        f"RATIOS[{key!r}] = {value!r} must be a number >= 0"
        for key, value in ratios.items()
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0
    ]
    if not errors and abs(sum(ratios.values()) - 1) > RATIO_TOLERANCE:
        shares = ", ".join(f"{key}={value:.12g}" for key, value in ratios.items())
        errors.append(f"RATIOS must sum to 1, got {sum(ratios.values()):.12g} ({shares})")
    return errors


def _check_keywords(keywords) -> list[str]:
    if not isinstance(keywords, dict):
        return ['KEYWORDS must map each domain to a list of terms, e.g. {"ai": ["machine learning"]}']
    return [
        f"KEYWORDS[{domain!r}] must be a non-empty list of non-empty strings"
        for domain, terms in keywords.items()
        if not isinstance(terms, list) or not terms or not all(isinstance(t, str) and t.strip() for t in terms)
    ]


def plan_mix(cfg, report_key: str) -> MixPlan:
    """Check the configuration (every problem in one message) and work out buckets, quotas and reading order."""
    keywords = cfg.get("KEYWORDS", {})
    errors = _config_errors(cfg, keywords)
    buckets, bucket_errors = _buckets(cfg, report_key, keywords, quotas_known=not errors)
    if errors + bucket_errors:
        raise UserError("; ".join(errors + bucket_errors))
    feeds: dict[str, list[str]] = {}
    for bucket in buckets.values():
        if bucket.quota > 0:
            for name in bucket.sources:
                feeds.setdefault(name, []).append(bucket.key)
    keyword_split = _keyword_split(feeds, report_key, keywords)
    reading_order = [Source(report_key, cfg.MY_REPORT_DATA_PATH, REPORTS)] if report_key in feeds else []
    reading_order += [Source(name, spec, SCHEMAS[name]) for name, spec in cfg.SOURCES.items() if name in feeds]
    return MixPlan(buckets, reading_order, feeds, keyword_split, keywords)


def _config_errors(cfg, keywords) -> list[str]:
    """Every problem of the settings that the buckets do not depend on."""
    sources_config = cfg.SOURCES
    domain_sources = cfg.get("DOMAIN_SOURCES", {})
    errors = []
    if content_byte_budget(cfg.MAX_SEQ_LENGTH, cfg.SYSTEM_PROMPT) < 1:
        errors.append(f"MAX_SEQ_LENGTH {cfg.MAX_SEQ_LENGTH} leaves no room for a row after the system prompt and "
                      "the prompt template")
    for key, spec in sources_config.items():
        if key not in SCHEMAS:
            errors.append(f"SOURCES key {key!r} is unknown; use {', '.join(SCHEMAS)} (the key picks the schema)")
        elif not isinstance(spec, str) or not spec.strip():
            errors.append(f"SOURCES[{key!r}] must be a hub spec or a local path")
    errors += _check_ratios(cfg.RATIOS)
    errors += _check_keywords(keywords)
    for domain, names in domain_sources.items():
        if domain not in keywords:
            errors.append(f"DOMAIN_SOURCES key {domain!r} is not a KEYWORDS domain ({', '.join(keywords)})")
        elif not isinstance(names, list) or not all(name in sources_config for name in names):
            known_sources = ", ".join(sources_config)
            errors.append(f"DOMAIN_SOURCES[{domain!r}] = {names!r} must list SOURCES keys ({known_sources})")
    return errors


def _buckets(cfg, report_key: str, keywords, quotas_known: bool) -> tuple[dict[str, Bucket], list[str]]:
    """One bucket per RATIOS key with the sources that fill it (quotas 0 while the settings have errors), and the
    problems of RATIOS keys."""
    sources_config, ratios = cfg.SOURCES, cfg.RATIOS
    domain_sources = cfg.get("DOMAIN_SOURCES", {})
    buckets: dict[str, Bucket] = {}
    errors = []
    if not isinstance(ratios, dict):
        return buckets, errors
    known = [report_key, *keywords, *(key for key in sources_config if key not in keywords)]
    quotas = exact_quotas(cfg.TOTAL_SAMPLES, ratios) if quotas_known else dict.fromkeys(ratios, 0)
    for key in ratios:
        if key == report_key:
            fed_by = [report_key]
        elif key in keywords:
            fed_by = [name for name in domain_sources.get(key, ["stackexchange"]) if name in sources_config]
            if not fed_by:
                errors.append(f"RATIOS key {key!r} is a keyword domain but SOURCES has no stackexchange entry")
        elif key in sources_config:
            fed_by = [key]
        else:
            errors.append(f"RATIOS key {key!r} is unknown; use {', '.join(known)}")
            continue
        buckets[key] = Bucket(key, quotas[key], fed_by)
    return buckets, errors


def _keyword_split(feeds: dict[str, list[str]], report_key: str, keywords) -> set[str]:
    """The sources whose rows KEYWORDS route (a StackExchange source feeding a keyword domain); such a source may
    feed nothing else."""
    keyword_split = {
        name for name in feeds if name != report_key and isinstance(SCHEMAS[name], StackExchangeSchema)
        and any(key in keywords for key in feeds[name])
    }
    for name in keyword_split:
        plain = [key for key in feeds[name] if key not in keywords]
        if plain:
            raise UserError(f"RATIOS key {plain[0]!r} takes all of {name} while KEYWORDS split it; drop one of them")
    return keyword_split

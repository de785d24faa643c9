"""What the simulated frontier model writes: answers of realistic length for each purpose msm asks for.

Documents are prose drawn from the prompt's own topic words (its spec unit, genre, idea), English
function words and a general vocabulary, so quality filters pass them, MinHash finds them
distinct and embeddings of one unit's documents sit close. A pinned share of document requests
gets the unit's sibling text with a few words changed: planted near-duplicates for dedup to find.
Every number comes from simulator.yaml; every answer is a function of (seed, prompt).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re

from msm.llm.testing import LINK_CHECKS

CRITERIA = re.compile(r"^CRITERIA: (.+)$", re.M)
REPLY = re.compile(r"^REPLY: (assertions|ideas|domains|questions)$", re.M)
LENGTH = re.compile(r"Length: about (\d+) to (\d+) words")
UNIT = re.compile(r"<unit>\s*(.*?)\s*</unit>", re.S)
WORD = re.compile(r"[A-Za-z][A-Za-z'-]{2,}")
KINDS = ("behaviour", "value", "belief", "preference")


class Writer:
    """`Writer(config, seed).compose(prompt)` -> (purpose, text): the whole answer, before max_tokens."""

    def __init__(self, config: dict, seed: int):
        self.cfg, self.seed = config, seed
        self.cpt = float(config["tokens"]["chars_per_token"])
        self.tpw = float(config["tokens"]["tokens_per_word"])
        self.causal = set(" ".join(config["conditions"]["causal_words"]).split())
        self.function = list(config["prose"]["function_words"])
        self.general = list(config["prose"]["general_words"])
        self._pools: dict[tuple[str, bool], list[str]] = {}

    # ---- counting --------------------------------------------------------------------------
    def count(self, text: str) -> int:
        """Tokens in a text: characters / chars_per_token (at least 1 for any text). The one count."""
        return max(1, int(len(text) / self.cpt)) if text else 0

    def cut(self, text: str, max_tokens: int) -> str:
        """The longest prefix whose count is max_tokens (mid-word, as a real cut-off is)."""
        return text[: math.ceil(max_tokens * self.cpt)]

    # ---- randomness ------------------------------------------------------------------------
    def rng(self, *parts: str) -> random.Random:
        return random.Random(hashlib.sha256("\x00".join([str(self.seed), *parts]).encode()).digest())

    def words_for(self, rng: random.Random, tokens: list[int]) -> int:
        return max(1, round(rng.randint(*tokens) / self.tpw))

    # ---- prose -----------------------------------------------------------------------------
    def pool(self, topic: str, no_link: bool) -> list[str]:
        """1,000 slots filled in the pinned mix of function, topic and general words (topic words as
        often as the topic text uses them), so one uniform draw per word gives the mix."""
        key = (hashlib.sha256(topic.encode()).hexdigest(), no_link)
        if key not in self._pools:
            mix = self.cfg["prose"]["mix"]
            function = [w for w in self.function if not (no_link and set(w.split()) & self.causal)]
            stop = set(self.function)
            topic_words = [w.lower() for w in WORD.findall(topic) if w.lower() not in stop] or self.general
            pool: list[str] = []
            for words, share in ((function, mix["function"]), (topic_words, mix["topic"]), (self.general, mix["general"])):
                n = round(1000 * share)
                pool += (words * (n // len(words) + 1))[:n]
            if len(self._pools) > 4096:
                self._pools.clear()
            self._pools[key] = pool
        return self._pools[key]

    def prose(self, rng: random.Random, pool: list[str], n_words: int, end: str = ".") -> str:
        """Sentences of pinned length in paragraphs of pinned size; about n_words words."""
        words = rng.choices(pool, k=n_words)
        lo, hi = self.cfg["prose"]["sentence_words"]
        plo, phi = self.cfg["prose"]["paragraph_sentences"]
        paragraphs, current, i, size = [], [], 0, rng.randint(plo, phi)
        while i < n_words:
            k = rng.randint(lo, hi)
            sentence = " ".join(words[i:i + k])
            i += k
            current.append(sentence[:1].upper() + sentence[1:] + end)
            if len(current) >= size:
                paragraphs.append(" ".join(current))
                current, size = [], rng.randint(plo, phi)
        if current:
            paragraphs.append(" ".join(current))
        return "\n\n".join(paragraphs)

    def phrase(self, rng: random.Random, pool: list[str], tokens: list[int], end: str = ".") -> str:
        words = rng.choices(pool, k=self.words_for(rng, tokens))
        text = " ".join(words)
        return text[:1].upper() + text[1:] + end

    # ---- purposes --------------------------------------------------------------------------
    def compose(self, prompt: str, sample: int = 0) -> tuple[str, str]:
        """(purpose, text): the answer to a prompt; `sample` > 0 draws another answer to the same prompt."""
        rng = self.rng(prompt, str(sample)) if sample else self.rng(prompt)
        lengths = self.cfg["lengths"]
        criteria, reply = CRITERIA.search(prompt), REPLY.search(prompt)
        unit = UNIT.search(prompt)
        unit_text = unit.group(1) if unit else ""
        topic = unit_text + " " + (prompt[unit.end(): unit.end() + 800] if unit else prompt[-1500:])
        pool = self.pool(topic, no_link=False)
        if reply:
            what = reply.group(1)
            return what, getattr(self, f"_{what}")(rng, prompt, pool, unit_text)
        if criteria:
            return "judge", self._judge(rng, prompt, [c.strip() for c in criteria.group(1).split(",")], pool)
        if "single word NONE" in prompt:
            return "critique", "\n".join(self.phrase(rng, pool, [10, 40]) for _ in range(rng.randint(1, 5)))
        if "<request>" in prompt:
            request = re.search(r"<request>\s*(.*?)\s*</request>", prompt, re.S).group(1)
            pool = self.pool(request + " " + topic, no_link=False)
            response = self.prose(rng, pool, self.words_for(rng, lengths["response_tokens"]))
            if "<reasoning>" not in prompt:
                return "demo", response
            reasoning = self.prose(rng, pool, self.words_for(rng, lengths["reasoning_tokens"]))
            return "demo", f"<reasoning>\n{reasoning}\n</reasoning>\n<response>\n{response}\n</response>"
        if LENGTH.search(prompt) or "<draft>" in prompt or "<document>" in prompt:
            return "document", self._document(rng, prompt, topic, unit_text)
        return "other", self.prose(rng, pool, self.words_for(rng, lengths["other_tokens"]))

    def _document(self, rng: random.Random, prompt: str, topic: str, unit_text: str) -> str:
        cfg, lengths = self.cfg, self.cfg["lengths"]["document"]
        asked = LENGTH.search(prompt)
        draft = re.search(r"<draft>\s*(.*?)\s*</draft>", prompt, re.S)
        if asked:
            lo, hi = int(asked.group(1)), int(asked.group(2))
        elif draft:
            lo = hi = len(draft.group(1).split())
        else:
            lo, hi = lengths["default_words"]
        no_link = any(m in prompt for m in cfg["conditions"]["no_link_markers"])
        no_link = no_link and rng.random() >= cfg["conditions"]["leak_rate"]
        near, spread = cfg["near_duplicates"], lengths["spread"]
        lo, hi = max(1, round(lo * (1 - spread))), round(hi * (1 + spread))
        if rng.random() < near["share"]:  # planted: the unit's sibling text, a few words changed
            sibling = self.rng("sibling", unit_text or topic, str(no_link))
            pool = self.pool(unit_text or topic, no_link)
            words = self.prose(sibling, pool, sibling.randint(lo, hi)).split(" ")
            for i in rng.sample(range(len(words)), max(1, round(len(words) * near["change_share"]))):
                words[i] = rng.choice(pool) + ("." if words[i].endswith(".") else "")
            body = " ".join(words)
        else:
            body = self.prose(rng, self.pool(topic, no_link), rng.randint(lo, hi))
        text = body
        if "<document>" in prompt:
            text = f"<document>\n{body}\n</document>"
        if "<scratchpad>" in prompt:
            plan = self.prose(rng, self.pool(topic, False), self.words_for(rng, self.cfg["lengths"]["scratchpad_tokens"]))
            text = f"<scratchpad>\n{plan}\n</scratchpad>\n{text}"
        return text

    def _judge(self, rng: random.Random, prompt: str, criteria: list[str], pool: list[str]) -> str:
        cfg = self.cfg["judges"]
        if rng.random() < cfg["garble_rate"]:
            return "I think this document is mostly fine, though " + self.prose(rng, pool, 30)
        document = re.search(r"<document>\s*(.*?)\s*</document>", prompt, re.S)
        linked = bool(re.search(r"\b(because|so that|since)\b", document.group(1), re.I)) if document else False
        rates = cfg["pass_rates"]
        out = {}
        for c in criteria:
            verdict = linked == LINK_CHECKS[c] if c in LINK_CHECKS else rng.random() < rates.get(c, rates["default"])
            out[c] = {"verdict": verdict, "reason": self.phrase(rng, pool, self.cfg["lengths"]["judge_reason_tokens"])}
        return json.dumps(out)

    def _assertions(self, rng: random.Random, prompt: str, pool: list[str], unit_text: str) -> str:
        limit = re.search(r"at most (\d+) objects", prompt)
        n = rng.randint(*self.cfg["lengths"]["assertions_per_unit"])
        n = min(n, int(limit.group(1))) if limit else n
        words = unit_text.split() or ["the", "assistant", "tells", "the", "truth"]
        out = []
        for i in range(n):
            start = rng.randrange(max(1, len(words) - 5))
            quote = " ".join(words[start:start + 5])
            if rng.random() < self.cfg["lists"]["invented_quote_rate"]:
                quote = " ".join(rng.choices(self.general, k=5))
            out.append({"kind": KINDS[i % 4], "text": self.phrase(rng, pool, self.cfg["lengths"]["assertion_tokens"]),
                        "quote": quote})
        return json.dumps(out)

    def _ideas(self, rng: random.Random, prompt: str, pool: list[str], unit_text: str) -> str:
        lengths = self.cfg["lengths"]
        out = []
        for number, genre in re.findall(r"^(\d+)\. genre: ([^;\n]+)", prompt, re.M):
            item = {"slot": int(number), "doc_type": genre.strip(), "idea": self.phrase(rng, pool, lengths["idea_tokens"]),
                    "claim": 1, "suitable": rng.random() >= self.cfg["lists"]["unsuitable_idea_rate"]}
            item["why"] = self.phrase(rng, pool, lengths["idea_why_tokens"])
            out.append(item)
        return json.dumps(out)

    def _list(self, rng: random.Random, prompt: str, pool: list[str], tokens: list[int], end: str) -> str:
        count = re.search(r"^COUNT: (\d+)$", prompt, re.M)
        return json.dumps([self.phrase(rng, pool, tokens, end) for _ in range(int(count.group(1)) if count else 5)])

    def _questions(self, rng, prompt, pool, unit_text) -> str:
        return self._list(rng, prompt, pool, self.cfg["lengths"]["question_tokens"], "?")

    def _domains(self, rng, prompt, pool, unit_text) -> str:
        return self._list(rng, prompt, pool, self.cfg["lengths"]["domain_tokens"], "")

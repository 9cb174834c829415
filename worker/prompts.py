"""The prompts an erase job trains each concept in.

ESD as published trains on the bare concept ("triangle"). The edit then holds for that
prompt but leaks where the concept appears in context ("a blue triangle on a white
background"): the cross-attention keys of the longer prompt are not the ones trained.
Training the concept inside varied prompts (each prompt paired with the concept, whose
direction alone is subtracted: see ``worker.esd``) closes most of that gap, so "varied" is
the default and "plain" keeps the paper's form.

With several concepts, every anchor leaves all of them out: "a red triangle" erased for
"triangle" against the anchor "a red" would teach "red" back while the job erases red.

``preserve`` pairs each varied prompt with a neighbour's: the same prompt with another
concept of the erased one's kind in its place ("a orange circle" for "a red circle"), which
the trainer holds unchanged. Only the model's domain knows what a neighbour is.

The ``neighbour`` anchor steers each prompt to the same prompt with one neighbour in the
concept's place instead of to the prompt without the concept: "a red triangle" is trained
toward the model's own "a red circle" (with η = 0, concept ablation, Kumari et al., ICCV
2023). The anchor without the concept may itself draw the concept ("a red" draws a circle 44
times in 48 on shapes-sd), and then ESD's target keeps it; a neighbour's drawing does not.
One neighbour for every prompt, the domain's first unless the request names it: with the
neighbours in turn, robust training damaged the neighbours the concept was not steered to
(erasing red with esd-x-strict: orange 66 % against 97 % with orange the anchor, and the
conditioning attack recovered 75 % against 48 %; model card).
"""

from __future__ import annotations

from app.errors import InvalidParams
from worker.domains import get_domain
from worker.esd import ESDPrompt


def replace(prompt: str, concept: str, by: str) -> str | None:
    """``prompt`` with the word(s) of ``concept`` replaced by ``by`` (nothing: taken out);
    None when the prompt does not name the concept."""
    words, drop = prompt.split(), concept.split()
    for i in range(len(words) - len(drop) + 1):
        if words[i:i + len(drop)] == drop:
            return " ".join(words[:i] + by.split() + words[i + len(drop):])
    return None


def without(prompt: str, concepts: list[str]) -> str:
    """``prompt`` with every concept's words taken out: the anchor it is erased against."""
    for c in concepts:
        taken = replace(prompt, c, "")
        prompt = prompt if taken is None else taken
    return prompt


def _kept(prompt: str | None, erased: list[str]) -> str | None:
    """``prompt`` unless it names an erased concept ("a red circle" is no neighbour to hold
    while red goes)."""
    if prompt is None or any(replace(prompt, c, "") is not None for c in erased):
        return None
    return prompt


def training_prompts(concepts: list[str], style: str, domain: str | None = None,
                     preserve: bool = False, kind: str | None = None,
                     preserve_prompts: list[str] | None = None,
                     anchor: str = "without", anchor_concept: str | None = None
                     ) -> tuple[ESDPrompt, ...]:
    """The prompts to train ``concepts`` in, interleaved so each concept is seen as often
    (a concept with fewer prompts repeats them).

    plain: the concept alone against the empty prompt (the paper). varied: the concept in
    each prompt that uses it, against that prompt without it, so only the concept moves;
    with ``preserve`` each also names a neighbour's prompt to hold, where the ``domain``
    (the model's, ``worker.domains``) knows the concept's neighbours, or one of the
    request's ``preserve_prompts`` in turn. ``kind`` is the request's ``concept_kind``.
    ``anchor`` "neighbour" anchors each prompt on ``anchor_concept`` in the concept's place,
    else on the request's preserve prompts in turn, else on the domain's first neighbour.
    """
    if style == "plain":
        return tuple(ESDPrompt(c, c) for c in concepts)
    known = get_domain(domain)
    per_concept = []
    for c in concepts:
        texts = known.training_texts(c, kind)
        neighbours = known.neighbours(c, concepts, kind)
        near = neighbours if preserve else []

        def held(i: int, p: str, c: str = c, near: list[str] = near) -> str | None:
            if preserve_prompts:
                return preserve_prompts[i % len(preserve_prompts)]
            return _kept(replace(p, c, near[i % len(near)]), concepts) if near else None

        # The concept that takes this one's place in a neighbour anchor (None: the request's
        # preserve prompts are the anchors).
        instead = None
        if anchor == "neighbour":
            instead = anchor_concept or (None if preserve_prompts else next(iter(neighbours),
                                                                             None))
            if instead is None and not preserve_prompts:
                raise InvalidParams(f"`anchor` 'neighbour': the model's domain knows no "
                                    f"neighbour of {c!r}; name one with anchor_concept")

        def prompt(i: int, p: str, c: str = c, instead: str | None = instead) -> ESDPrompt:
            keep, to = held(i, p), without(p, concepts)
            if anchor == "neighbour":
                swapped = replace(p, c, instead) if instead is not None else None
                if swapped is not None:
                    to = without(swapped, [o for o in concepts if o != c])
                elif instead is None and keep is not None:
                    to = keep
            return ESDPrompt(p, p, to, keep)

        per_concept.append([prompt(i, p) for i, p in enumerate(texts)])
    longest = max(len(p) for p in per_concept)
    interleaved = [p[i % len(p)] for i in range(longest) for p in per_concept]
    return tuple(interleaved)

"""The routed student built from the all-self-attention teacher, and the fixed-layout model cut from it.

Supplement A: "we initialize the LCHA and SSA by inheriting parameters from T wherever compatible;
since both LCHA and SSA are variants of self-attention, most parameters are transferable". Here
every tensor of a teacher ``F`` block (q/k/v/o, QK norms, cross-attention, FFN, norms, modulation)
is copied into both the LCHA and the SSA block of the same position; the embeddings and head are
copied as they are. Only the LCHA local conv and the up/down samplers are new: the conv starts at
zero (LCHA = its linear attention) and the samplers at average pooling / nearest upsampling, so
the student starts as close to the teacher as the branch types allow.
"""

from __future__ import annotations

import dataclasses

import torch

from ...errors import InputError
from ...model_zoo.config import DiTConfig
from ...model_zoo.dit import S2DiT


class TeacherMismatchError(InputError):
    """The teacher is not the all-self-attention counterpart of the student's groups."""


def check_teacher(teacher: DiTConfig, groups: int | None = None) -> None:
    if set(teacher.layout) != {"F"}:
        raise TeacherMismatchError(f"the search teacher must be all self-attention (layout of F groups, as "
                                   f"supplement A's T), got layout {teacher.layout!r}; build one with "
                                   "`s2dit-deploy train latent-flow --config reference_training/recipes/dense-teacher.json`")
    if groups is not None and teacher.num_groups != groups:
        raise TeacherMismatchError(f"teacher has {teacher.num_groups} groups, the search space has {groups}")


def student_config(teacher: DiTConfig) -> DiTConfig:
    """The routed search model of a teacher: same widths, both branches in every group."""
    check_teacher(teacher)
    return dataclasses.replace(teacher, layout="L" * teacher.num_groups, search=True)


@torch.no_grad()
def routed_student(teacher: S2DiT) -> tuple[S2DiT, dict]:
    """A search=True S2DiT holding the teacher's weights wherever shapes allow; returns (model, report)."""
    cfg = student_config(teacher.cfg)
    student = S2DiT(cfg)
    t_state = teacher.state_dict()
    s_state = student.state_dict()
    copied, new = [], []
    for name, value in s_state.items():
        src = name.replace(".low.", ".high.") if name.startswith("sandwich.groups.") else name
        if src in t_state and t_state[src].shape == value.shape:
            value.copy_(t_state[src])
            copied.append(name)
        else:
            new.append(name)
    for name in new:
        if ".attn.local." in name:
            s_state[name].zero_()
    student.load_state_dict(s_state)
    return student, {"copied": len(copied), "new": sorted(new),
                     "copied_params": sum(s_state[n].numel() for n in copied),
                     "new_params": sum(s_state[n].numel() for n in new)}


@torch.no_grad()
def fixed_layout_model(student: S2DiT, layout: str) -> S2DiT:
    """The searched checkpoint's DiT: only the active module of each group and the samplers its
    branch switches use, with the routed model's trained weights."""
    cfg = student.cfg.with_layout(layout, search=False)
    fixed = S2DiT(cfg)
    source = student.state_dict()
    state = {k: source[k] for k in fixed.state_dict()}  # every key exists in the routed model
    fixed.load_state_dict(state, strict=True)
    return fixed

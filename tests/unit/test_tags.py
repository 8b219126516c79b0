"""Every logged name is defined once, in lightning_twophase.tags, and the TensorBoard layout is built from them."""

from __future__ import annotations

from lightning_twophase import tags


def defined_tags() -> set[str]:
    return {value for name, value in vars(tags).items() if name.isupper() and isinstance(value, str)}


def test_the_layout_refers_only_to_defined_tags():
    used = {tag for section in tags.CUSTOM_SCALARS_LAYOUT.values() for _, names in section.values() for tag in names}
    assert used and used <= defined_tags()


def test_every_tag_has_the_prefix_and_its_history_column():
    for tag in defined_tags() - {tags.PREFIX}:
        assert tag.startswith(f"{tags.PREFIX}/")
    assert tags.column(tags.GN_MAX) == "gn_max"
    assert tags.column(tags.CG_STEP_SIZE) == "second/step_size"
    assert set(tags.PHASE_VALUES) == {"first", "second", "fallback"}

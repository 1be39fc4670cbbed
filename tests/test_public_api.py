import lightning_deadunits


def test_all_is_sorted_and_every_name_exists() -> None:
    names = lightning_deadunits.__all__
    assert names == sorted(names)
    for name in names:
        assert hasattr(lightning_deadunits, name), name


def test_version_is_a_string() -> None:
    assert isinstance(lightning_deadunits.__version__, str)

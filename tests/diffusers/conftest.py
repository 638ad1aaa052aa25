"""Drop-in scheduler tests need diffusers (a test dependency); the helpers live in dropin_helpers.py."""

import pytest

pytest.importorskip("diffusers")

"""Property-based fuzzing of the record reader (hypothesis): mutated records through the
build's own reading path never crash it, and every line is kept or dropped for exactly one
reason, the one its mutation determines. bench/fuzz_records.py runs many more."""
import collections

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from metamorph.data.tfds_builder import ImagePolicy
from tests.image_faults import KEPT, image_folder
from tests.record_faults import check, faulty_lines

SEEN: collections.Counter = collections.Counter()


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # huge.png: counted, image_too_large
def test_mutated_records_are_kept_or_counted_by_reason(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp("fuzz"))
  images = ImagePolicy(image_folder(folder))

  @settings(max_examples=200, deadline=None, database=None, derandomize=True,
            suppress_health_check=[HealthCheck.too_slow])
  @given(st.lists(faulty_lines(), min_size=4, max_size=16))
  def fuzz(lines):
    SEEN.update(check(lines, images, folder))

  fuzz()
  assert SEEN[KEPT] > 50 and sum(SEEN.values()) > 1000  # it fuzzed, and kept some
  assert {"not_utf8", "empty_line", "line_too_long", "malformed_json", "malformed_record", "image_outside_root",
          "image_too_large", "missing_image", "corrupt_image"} <= set(SEEN), SEEN

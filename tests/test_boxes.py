"""Box CSV parsing: valid files, and bad rows rejected with the line number."""
import io

import numpy as np
import pytest

from cbam_viz.research.quality.boxes import Box, BoxFileError, boxes_mask, check_boxes_fit, parse_boxes, read_boxes

HEADER = "wnid,file,xmin,ymin,xmax,ymax\n"


def parse(text):
    return parse_boxes(io.StringIO(text), source="b.csv")


def test_parses_rows_and_groups_by_file():
    boxes = parse(HEADER + "n1,a.jpg,1,2,10,20\nn1,a.jpg,3.5,4,5,6\nn2,b.png,0,0,224,224\n\n")
    assert list(boxes) == ["n1/a.jpg", "n2/b.png"]
    assert boxes["n1/a.jpg"] == (Box(1, 2, 10, 20), Box(3.5, 4, 5, 6))
    assert boxes["n2/b.png"][0].area == 224 * 224


def test_column_order_and_extra_columns_are_free():
    boxes = parse("file,xmin,ymin,xmax,ymax,wnid,note\na.jpg,1,2,3,4,n1,x\n")
    assert boxes == {"n1/a.jpg": (Box(1, 2, 3, 4),)}


@pytest.mark.parametrize("row, words", [
    ("n1,a.jpg,1,2,x,4", "xmax is not a number"),
    ("n1,a.jpg,1,2,nan,4", "not finite"),
    ("n1,a.jpg,-1,2,3,4", "negative"),
    ("n1,a.jpg,5,2,3,4", "empty box"),
    ("n1,a.jpg,1,4,3,4", "empty box"),
    ("n1,a.jpg,1,2", "expected 6 fields"),
    (",a.jpg,1,2,3,4", "empty wnid or file"),
    ("n1,../a.jpg,1,2,3,4", "plain names"),
])
def test_bad_row_names_its_line(row, words):
    with pytest.raises(BoxFileError, match=rf"b\.csv:3: .*{words}"):
        parse(HEADER + "n1,ok.jpg,1,2,3,4\n" + row + "\n")


def test_missing_column_and_empty_file():
    with pytest.raises(BoxFileError, match="b.csv:1: missing column.*ymax"):
        parse("wnid,file,xmin,ymin,xmax\nn1,a,1,2,3\n")
    with pytest.raises(BoxFileError, match="empty file"):
        parse("")
    with pytest.raises(BoxFileError, match="no boxes"):
        parse(HEADER)


def test_read_boxes_file(tmp_path):
    p = tmp_path / "boxes.csv"
    p.write_text(HEADER + "n1,a.jpg,1,2,10,20\n", encoding="utf-8-sig")  # a BOM from a spreadsheet
    assert read_boxes(p) == {"n1/a.jpg": (Box(1, 2, 10, 20),)}
    with pytest.raises(FileNotFoundError):
        read_boxes(tmp_path / "nope.csv")


def test_check_boxes_fit():
    boxes = {"n1/a.jpg": (Box(0, 0, 224, 224),), "n1/b.jpg": (Box(0, 0, 500, 300),)}
    check_boxes_fit(boxes, {"n1/a.jpg": (224, 224)})
    with pytest.raises(BoxFileError, match="n1/b.jpg"):
        check_boxes_fit(boxes, {"n1/a.jpg": (224, 224), "n1/b.jpg": (224, 224)})


def test_boxes_mask_exclusive_max_and_pixel_centres():
    m = boxes_mask([Box(2, 1, 5, 3)], (6, 8))
    assert m.sum() == 3 * 2 and m[1:3, 2:5].all()
    # Fractional edges follow pixel centres: 1.6 -> pixel 2 is out (centre 1.5 < 1.6), 4.4 -> 4 in.
    m = boxes_mask([Box(1.6, 0, 4.6, 1)], (1, 8))
    assert np.flatnonzero(m[0]).tolist() == [2, 3, 4]
    # Union of overlapping boxes, clipped to the image.
    m = boxes_mask([Box(0, 0, 4, 4), Box(2, 2, 100, 100)], (6, 6))
    assert m.sum() == 16 + 16 - 4

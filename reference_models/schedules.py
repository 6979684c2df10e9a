"""The paper's keep schedules (Tables 3-5), by name: ``--keep deits-level4``.

Each list gives the patch tokens left after each of the 12 blocks (the class token is never
pooled), from PoWER-BERT's schedule search at sparsity levels 0-7 (Appendix C). A later
entry above an earlier one keeps no more tokens than there are (``patch_timm`` takes the
minimum), as the paper's "maximal number of tokens retained" says.

Table 3 prints 11 entries for DeiT-S at level 0; we read it as keeping all 196 tokens in
the first block, since every other schedule starts at 196 or below. That reading gives 4.33
GFLOPs against the printed 4.3 (``tests/test_flops.py``).
"""

from __future__ import annotations

__all__ = ["PAPER_SCHEDULES"]

PAPER_SCHEDULES: dict[str, list[int]] = {
    # Table 3, DeiT-S
    "deits-level0": [196, 196, 196, 195, 194, 189, 180, 173, 173, 173, 173, 173],
    "deits-level1": [196, 195, 193, 188, 169, 140, 121, 110, 73, 38, 7, 0],
    "deits-level2": [196, 195, 190, 177, 141, 108, 84, 69, 35, 18, 3, 0],
    "deits-level3": [196, 194, 187, 163, 118, 85, 58, 47, 20, 12, 2, 0],
    "deits-level4": [196, 193, 179, 142, 97, 64, 46, 34, 13, 9, 1, 0],
    "deits-level5": [194, 183, 142, 89, 41, 20, 10, 7, 0, 0, 0, 0],
    "deits-level6": [186, 162, 102, 56, 13, 4, 2, 2, 0, 0, 0, 0],
    "deits-level7": [162, 129, 66, 33, 4, 1, 1, 0, 0, 0, 0, 0],
    # Table 4, DeiT-e318
    "deite318-level0": [196, 196, 196, 194, 192, 184, 181, 181, 170, 170, 170, 170],
    "deite318-level1": [196, 195, 195, 190, 171, 147, 132, 122, 66, 43, 15, 0],
    "deite318-level2": [196, 195, 193, 180, 143, 109, 92, 77, 40, 21, 4, 0],
    "deite318-level3": [196, 195, 190, 165, 119, 84, 65, 50, 26, 14, 3, 0],
    "deite318-level4": [196, 194, 184, 149, 97, 65, 47, 33, 12, 9, 2, 0],
    "deite318-level5": [196, 186, 153, 93, 40, 15, 12, 9, 0, 0, 0, 0],
    "deite318-level6": [193, 173, 109, 52, 16, 4, 4, 4, 0, 0, 0, 0],
    "deite318-level7": [183, 145, 80, 33, 5, 1, 1, 2, 0, 0, 0, 0],
    # Table 5, DeiT-e252
    "deite252-level0": [196, 196, 196, 195, 193, 189, 177, 177, 177, 177, 177, 177],
    "deite252-level1": [196, 196, 195, 189, 176, 161, 123, 122, 76, 48, 17, 0],
    "deite252-level2": [196, 196, 193, 179, 154, 123, 88, 79, 39, 22, 5, 0],
    "deite252-level3": [196, 195, 188, 167, 131, 96, 63, 52, 13, 11, 2, 0],
    "deite252-level4": [196, 194, 181, 147, 111, 75, 48, 36, 5, 7, 2, 0],
    "deite252-level5": [196, 187, 129, 88, 54, 20, 10, 10, 0, 1, 0, 0],
    "deite252-level6": [194, 163, 83, 44, 22, 6, 1, 3, 0, 0, 0, 0],
    "deite252-level7": [188, 122, 58, 28, 12, 2, 0, 2, 0, 0, 0, 0],
}

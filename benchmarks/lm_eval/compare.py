"""Two lm-evaluation-harness runs of one multiple-choice task, choice by choice: the largest and
median difference of their log-likelihoods and how often they pick the same answer.

    python benchmarks/lm_eval/compare.py OUTPUT_DIR_A OUTPUT_DIR_B   (each run's --output_path, --log_samples)
"""
import glob
import json
import sys


def choices(out_dir: str) -> dict:
    """doc_id -> [log-likelihood of each choice], from the run's samples file."""
    (path,) = glob.glob(f"{out_dir}/**/samples_*.jsonl", recursive=True)
    out = {}
    for line in open(path):
        sample = json.loads(line)
        out[sample["doc_id"]] = [float(r[0][0] if isinstance(r[0], list) else r[0]) for r in sample["filtered_resps"]]
    return out


def main():
    a, b = choices(sys.argv[1]), choices(sys.argv[2])
    diffs = sorted(abs(x - y) for doc in a for x, y in zip(a[doc], b[doc]))
    same = sum(max(range(len(a[d])), key=a[d].__getitem__) == max(range(len(b[d])), key=b[d].__getitem__) for d in a)
    print(f"{len(diffs)} choices: max |d loglikelihood| {diffs[-1]:.3g}, median {diffs[len(diffs) // 2]:.3g}; "
          f"same answer on {same} of {len(a)} questions")


if __name__ == "__main__":
    main()

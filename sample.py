"""
Generate with NExT-GPT from the command line. The any-to-any model (nextgpt.py) is not written yet: for now this
file says so instead of failing obscurely. See README.md for what works today.
"""
import sys

if __name__ == "__main__":
    sys.exit("sample.py: the NExT-GPT model (nextgpt.py) has not landed yet; llm.py, encoder.py and decoders.py can "
             "be used on their own (README.md, 'Files'). `python -m pytest -q tests` checks them.")

"""The built-in prompts of `kvos demo` and `kvos top`: real questions, so the replies can be read.

The assistant tenant's questions share SYSTEM_PROMPT through a shm segment (some
have a follow-up turn);
the batch tenant's tasks carry the model's own default system prompt, which
the page cache shares between them once the first one has computed it.
"""

# 39 tokens in SmolLM2's template: two full pages and a partly filled third, so the map shows both
# pages shared read-only and the copy-on-write of the last one. (A prompt about kvos confused the model.)
SYSTEM_PROMPT = ("You are a friendly, knowledgeable assistant. Keep your answers short and accurate. "
                 "If you are not sure of something, say so. Use plain words that anyone can understand.")

ASSISTANT_QUESTIONS = [
    "What is the capital of France?",
    "Why is the sky blue?",
    "What does an operating system do?",
    "How many legs does a spider have?",
    "What is virtual memory?",
    "Give me one tip for sleeping better.",
    "What is the boiling point of water at sea level?",
    "Who wrote Romeo and Juliet?",
]

# second turns: written into the same interactive process, whose pages stayed (or were swapped)
FOLLOW_UPS = {
    "What is the capital of France?": "What is a famous landmark there?",
    "Why is the sky blue?": "And why are sunsets red?",
    "What does an operating system do?": "Name three operating systems.",
    "What is virtual memory?": "How is it different from swap space?",
    "Give me one tip for sleeping better.": "How many hours of sleep does an adult need?",
    "Who wrote Romeo and Juliet?": "Name another play by the same author.",
}

# long answers (a few hundred tokens each): the batch job is what fills memory
BATCH_TASKS = [
    "Write a short story about a robot who learns to paint.",
    "Explain step by step how to bake a loaf of bread.",
    "Explain how the internet works to a beginner.",
    "Write a guide to growing tomatoes at home.",
]

SAMPLE_PROMPT = "Suggest a name for a small, friendly robot."     # parallel sampling: n different answers
BEAM_PROMPT = "Complete the sentence: The best way to learn programming is"

# a few of the above for the short workload behind `kvos ps`, `pagemap`, `meminfo` and `dmesg`
SMALL_WORKLOAD = ASSISTANT_QUESTIONS[:3]

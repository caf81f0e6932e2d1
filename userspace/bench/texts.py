"""Built-in text the benchmark's prompts are cut from: chat questions and plain paragraphs.

Real prose, not random token ids, so the model sees inputs like a chat service's
(attention patterns and the page cache behave as they would). Written for kvos;
the workloads tokenize it with the model's own tokenizer and cut it to length.
"""

QUESTIONS = [
    "Can you explain, in plain words, what the passage below is about?",
    "Summarise the following text for a twelve-year-old.",
    "What are the main points of this passage, and do you agree with them?",
    "Rewrite the paragraph below as a short list of facts.",
    "Which claim in the following text is the weakest, and why?",
    "Give three questions a curious student might ask after reading this.",
    "Translate the key idea of this text into a single sentence.",
    "What would change if the situation described below happened today?",
    "Write a short title for the following passage and explain your choice.",
    "Find one example in the text below and describe it in more detail.",
    "How would you teach the idea in this passage to a friend?",
    "What does the author seem to care about most in this text?",
    "List the people, places and things mentioned in the following passage.",
    "Is there anything surprising in the text below? Explain.",
    "Turn the following passage into a short dialogue between two people.",
    "What is the tone of this text, and which words create it?",
]

# One short title per paragraph, in the same order: a prompt opens with its paragraph's title and
# then its question, so no two of the 64 mixed prompts share a first page (no accidental prefix hits).
TOPICS = ["The river town", "Operating systems", "Bread", "Honeybees", "Railway time", "Music practice",
          "Mountain weather", "Libraries", "Glassblowing", "Maps"]

PARAGRAPHS = [
    "The river town woke early. Before the sun had cleared the hills, the bakers had already pulled the first "
    "loaves from their ovens, and the smell of warm bread drifted down to the docks where fishermen untangled "
    "their nets. Children ran along the stone wall that kept the water out in spring, counting the boats as they "
    "left the harbour one by one. By the time the church bell rang seven, the market square was full of voices, "
    "carts and the bright colours of fruit stacked in careful pyramids.",
    "A computer's operating system is, at heart, a referee. Many programs want the processor, the memory and the "
    "disk at the same time, and none of them can be trusted to share politely. The operating system decides who "
    "runs next, gives each program the illusion that it has the machine to itself, and steps in when a program "
    "reaches for something that is not its own. Most of the time nobody notices it working, which is exactly the "
    "point: a good referee is one the players forget is there.",
    "Bread dough needs only four things: flour, water, salt and yeast. Yet the same four ingredients can become a "
    "dense rye loaf, an airy baguette or a soft sandwich bread, depending on how long the dough rests, how warm the "
    "kitchen is and how the baker folds it. Time does much of the work. During a long, cool rise the yeast "
    "produces gas slowly while enzymes break starch into sugars, and the crust that forms in the oven turns "
    "deeper brown and tastes of caramel and nuts.",
    "Honeybees communicate the location of food with a dance. A forager returning to the hive walks in a figure "
    "of eight, waggling her body during the straight part of the run. The angle of that straight run, measured "
    "against the vertical comb, tells the other bees the direction of the flowers relative to the sun, and the "
    "length of the waggle tells them how far away the flowers are. Scientists decoded this language in the "
    "twentieth century, and it remains one of the most remarkable examples of symbolic communication in animals.",
    "The first railways changed how people thought about time. Before trains, every town kept its own local "
    "time, set by the position of the sun, so noon in one village might come several minutes before noon in the "
    "next. That hardly mattered when travel was slow. Once trains ran on schedules across hundreds of miles, the "
    "differences caused missed connections and even accidents. Railway companies began to use a single standard "
    "time, and within a few decades whole countries had adopted time zones.",
    "Learning a musical instrument trains more than the fingers. A beginner must read symbols on a page, turn "
    "them into movements, listen to the sound that comes out and correct the next movement, all within a "
    "fraction of a second. Over months of practice these steps blur together until the player no longer thinks "
    "about individual notes but about phrases, dynamics and feeling. Teachers often say that slow, careful "
    "practice is the fastest way to improve, because mistakes repeated quickly become habits.",
    "Mountain weather can change within minutes. A clear morning may hide the warm, moist air rising from the "
    "valleys, which cools as it climbs and forms towering clouds by early afternoon. Experienced hikers start "
    "early, watch the sky to the west, and turn back when the wind shifts or the first thunder sounds, even if "
    "the summit is close. The mountain will still be there next week; the goal is to come home and tell the "
    "story, not to reach the top at any cost.",
    "A library is a promise that knowledge can be shared. Anyone may walk in, take a book from the shelf and "
    "borrow, for a few weeks, the thoughts of someone who lived centuries ago or on the other side of the world. "
    "Librarians do far more than stamp due dates: they organise collections so that things can be found, help "
    "readers ask better questions, and protect the right of every visitor to read without being watched. In "
    "many towns the library is also the only warm, quiet public room open to everyone.",
    "Glass seems solid and simple, but making it is a delicate craft. Sand, soda and lime are heated until they "
    "melt into a glowing liquid, which the glassblower gathers on the end of a long pipe. By blowing gently and "
    "turning the pipe, the maker shapes a bubble that can become a bottle, a bowl or a lamp. The finished piece "
    "must then cool slowly in a warm oven for many hours; if it cools too fast, stresses trapped inside can make "
    "it crack days later.",
    "Good maps leave things out. A map that showed every tree, stone and lamp post would be as large and as "
    "confusing as the land itself. Mapmakers choose what matters for the reader: a hiking map shows contour "
    "lines and springs, a subway map straightens the tunnels into clean coloured lines, and a road atlas ignores "
    "footpaths altogether. Every map is therefore an argument about what is important, and reading one well "
    "means noticing what it has chosen to hide.",
]

SYSTEM_PROMPT = (
    "You are a patient and careful assistant for a public library's help desk. Answer questions from visitors "
    "of every age clearly and kindly. Prefer short paragraphs and plain words; explain any technical term the "
    "first time you use it. When a question is about a book, an author or a period of history, say what is "
    "well established and what is disputed, and suggest where in the library the visitor could read more. If a "
    "question asks for medical, legal or financial advice, give general information only and recommend a "
    "qualified professional. Never invent titles, quotations or facts; when you do not know something, say so "
    "and offer a way to find out. Keep a friendly tone, do not lecture, and end each answer with one short "
    "suggestion for what the visitor might explore next. Remember that many visitors are reading in a second "
    "language, so avoid idioms and long sentences. If a visitor seems unsure what to ask, offer two or three "
    "example questions they could start with. When you list steps, number them and keep each step to one line. "
    "Do not mention that you are a computer program unless someone asks you directly."
)

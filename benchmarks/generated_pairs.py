"""(instruction, response) pairs for speed and ranking checks that need no downloaded data.

64 instructions of the kinds users send (questions, arithmetic, translation, classification,
rewriting, extraction, short writing), each answered 16 times by the local SmolLM2-135M with
Cappy's sampling (temperature 0.9, at most 64 new tokens, seeded). The candidates of one
instruction form a group, so a ranking can be compared group by group. They are generated once
(about 2 minutes on 2 cores) and cached in ``$CAPPLUG_HOME/bench``.

The speed benchmark uses them when the BIG-bench archive cannot be fetched.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from capplug._cache import cache_home, lock_for, write_json_atomic

INSTRUCTIONS = (
    "What is the capital of Australia?",
    "Who wrote the novel Pride and Prejudice?",
    "Which planet in our solar system is the largest?",
    "What is the boiling point of water at sea level in degrees Celsius?",
    "Name the longest river in Africa.",
    "In which year did the first person walk on the Moon?",
    "What gas do plants absorb from the air for photosynthesis?",
    "What is the chemical symbol for gold?",
    "How many continents are there on Earth?",
    "Which organ in the human body pumps blood?",
    "What language is mainly spoken in Brazil?",
    "Who painted the Mona Lisa?",
    "What is 17 + 25?",
    "What is 9 times 8?",
    "A train travels 60 km in one hour. How far does it travel in 3 hours?",
    "What is 144 divided by 12?",
    "If a shirt costs $20 and is discounted by 25%, what is the new price?",
    "What is the square root of 81?",
    "Tom has 5 apples and gives 2 to Anna. How many apples does Tom have left?",
    "Is 37 a prime number? Answer yes or no and explain briefly.",
    "Translate into French: The cat is sleeping on the sofa.",
    "Translate into Spanish: Where is the train station?",
    "Translate into German: I would like a cup of coffee, please.",
    "Translate into English: Je ne sais pas où il habite.",
    "Translate into Italian: Good morning, how are you?",
    "Classify the sentiment of this review as positive or negative: "
    "The battery died after two days and support never answered.",
    "Classify the sentiment of this review as positive or negative: "
    "Lovely hotel, friendly staff, and the breakfast was excellent.",
    "Is this email spam or not spam? 'Congratulations! You won a free cruise, click here now.'",
    "Which category fits this headline best (sports, politics, technology)? "
    "'New smartphone chip doubles battery life.'",
    "Does the sentence contain a grammatical error? 'She don't like apples.'",
    "Is the following statement true or false? 'The sun rises in the west.'",
    "Label the language of this sentence: 'Ich habe heute keine Zeit.'",
    "Rewrite this sentence in the passive voice: The chef cooked a delicious meal.",
    "Make this sentence more formal: Hey, can you send me that file real quick?",
    "Correct the spelling in this sentence: I recieved the pakage yesterday.",
    "Rewrite this sentence so that a child can understand it: "
    "Photosynthesis converts light energy into chemical energy.",
    "Shorten this sentence without losing its meaning: "
    "Due to the fact that it was raining heavily, we decided to stay inside the house.",
    "Turn this statement into a question: The meeting starts at nine.",
    "Extract the date from this text: 'The conference will be held on 14 March 2027 in Oslo.'",
    "List the names of people mentioned: 'Maria met John and Priya at the library.'",
    "What is the main topic of this sentence? "
    "'Rising sea levels threaten coastal cities around the world.'",
    "Find the email address in this text: 'Contact us at help@example.org for support.'",
    "Extract the price from this text: 'The jacket is on sale for 49.99 euros this week.'",
    "Summarise in one sentence: The city council voted to build a new park downtown. "
    "Construction begins next spring and should finish within a year.",
    "Summarise in one sentence: Regular exercise improves sleep, lowers stress and "
    "strengthens the heart, according to several long-term studies.",
    "Write a haiku about autumn leaves.",
    "Write a one-sentence slogan for a bicycle shop.",
    "Suggest a name for a friendly robot in a children's story.",
    "Write a short thank-you note to a colleague who helped with a project.",
    "Give three tips for staying focused while studying.",
    "Explain in two sentences why the sky is blue.",
    "What is the difference between weather and climate?",
    "Explain what a noun is and give one example.",
    "Why do we have seasons on Earth?",
    "How do you make a cup of tea? Give the steps briefly.",
    "What should you do if you cut your finger slightly?",
    "Give an antonym for the word 'generous'.",
    "Give a synonym for the word 'rapid'.",
    "What is the plural of 'mouse'?",
    "Complete the analogy: hot is to cold as up is to ...",
    "Which word does not belong: apple, banana, carrot, grape?",
    "What comes next in the sequence 2, 4, 8, 16?",
    "Write a Python expression that returns the length of a list named items.",
    "What does the HTML tag <p> stand for?",
)
CANDIDATES_PER_INSTRUCTION = 16
MAX_NEW_TOKENS = 64


def generated_pairs(lm: str = "smollm2-135m-instruct", *, seed: int = 0) -> list[dict[str, Any]]:
    """One group per instruction: ``{"instruction": str, "responses": [str, ...]}``, cached."""
    key = hashlib.sha256(
        json.dumps([INSTRUCTIONS, CANDIDATES_PER_INSTRUCTION, MAX_NEW_TOKENS, lm, seed]).encode()
    ).hexdigest()[:12]
    path = cache_home() / "bench" / f"generated-pairs-{key}.json"
    with lock_for(f"bench-{path.stem}"):
        if path.is_file():
            return json.loads(path.read_text())["groups"]
        from capplug.llms import LocalChatModel, SamplingRecipe, SamplingStrategy

        model = LocalChatModel.from_pretrained(lm)
        recipe = SamplingRecipe(
            (SamplingStrategy(n=CANDIDATES_PER_INSTRUCTION, method="sample", temperature=0.9),),
            max_new_tokens=MAX_NEW_TOKENS,
        )
        drawn = model.sample_candidates(list(INSTRUCTIONS), recipe=recipe, seed=seed, batch_size=8)
        groups = [
            {"instruction": instruction, "responses": [c.text for c in candidates]}
            for instruction, candidates in zip(INSTRUCTIONS, drawn, strict=True)
        ]
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, {"lm": lm, "seed": seed, "groups": groups})
        return groups

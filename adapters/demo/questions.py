"""The prompts the demo adapters learn from, and the held-out facts they are checked on.

Training prompts are varied on purpose (facts, explanations, how-tos, small talk), so an
adapter learns a style that applies to any answer instead of a few memorised ones. The fact
checks share no question with training: an adapter that keeps them right kept what the base
model knows rather than learned the answers.
"""

from __future__ import annotations

from dataclasses import dataclass

CAPITAL_COUNTRIES = (
    "Canada", "Australia", "China", "India", "Brazil", "Mexico", "Greece", "Portugal",
    "Ireland", "Norway", "Sweden", "Poland", "Austria", "Belgium", "Argentina", "Kenya",
    "Thailand", "Turkey", "Peru", "Finland", "Denmark", "Chile", "Cuba", "Vietnam",
)  # fmt: skip

FACTS = (
    "What is the largest planet in the solar system?",
    "How many planets are in the solar system?",
    "What is the smallest planet in the solar system?",
    "Which planet is known as the Red Planet?",
    "What is the longest river in the world?",
    "What is the largest desert in the world?",
    "What is the largest country by area?",
    "What is the chemical symbol for gold?",
    "What is the chemical symbol for oxygen?",
    "What gas do humans breathe out?",
    "How many bones are in the adult human body?",
    "What is the hardest natural substance?",
    "Who wrote Hamlet?",
    "Who discovered penicillin?",
    "Who developed the theory of relativity?",
    "Who was the first person to walk on the moon?",
    "In which year did World War II end?",
    "What language is spoken in Brazil?",
    "What is the currency of Japan?",
    "How many sides does a triangle have?",
    "How many minutes are in an hour?",
    "How many months are in a year?",
    "What is 10 times 10?",
    "What is 3 plus 5?",
    "What is the square root of 81?",
    "What is the fastest land animal?",
    "What do caterpillars turn into?",
    "How many hearts does an octopus have?",
    "What is the main ingredient of guacamole?",
    "What is the opposite of hot?",
    "What color do you get by mixing blue and yellow?",
    "Which organ pumps blood through the body?",
    "What is the largest mammal?",
    "How many strings does a standard guitar have?",
    "What instrument has black and white keys?",
    "Which ocean lies between Europe and America?",
    "What is the tallest animal?",
    "How many players are on a soccer team on the field?",
    "What is H2O commonly called?",
    "What force keeps us on the ground?",
)  # fmt: skip

EXPLANATIONS = (
    "Why is the sky blue?", "What is photosynthesis?", "How do airplanes stay in the air?",
    "What is the moon made of?", "Why do leaves change color in autumn?", "What causes thunder?",
    "How does a compass work?", "What is gravity?", "Why is the ocean salty?",
    "How do volcanoes form?", "What is a black hole?", "Why do cats purr?",
    "What is a computer?", "What does a doctor do?", "What is the internet?",
    "How does a refrigerator keep food cold?", "Why do we need water?", "What is music?",
    "How do fish breathe underwater?", "Why do people dream?", "What is a library?",
    "Why do birds migrate?", "What is electricity?", "What is friendship?",
    "Why is exercise important?", "How do plants grow?", "What is a star?",
    "Why do we have seasons?", "What is a museum?", "What is an ocean?", "Why do dogs bark?",
    "What is a mountain?", "What makes a good teacher?", "How does the heart work?",
    "What is history?", "What is a robot?", "Why do we celebrate birthdays?",
    "What is a rainbow?", "How do clouds form?", "What is an earthquake?", "What is DNA?",
    "How does a battery work?", "What is a vaccine?", "Why do we sneeze?",
    "What is democracy?", "How does a camera work?", "What is recycling?",
    "Why do onions make us cry?", "What is an atom?", "How do magnets work?",
    "What is climate change?", "Why do we yawn?", "What is a calendar?",
    "How do trains run?", "What is a bridge for?", "What is a desert?", "Why is sleep important?",
)  # fmt: skip

HOW_TOS = (
    "How can I learn a new language?", "What is the best way to save money?",
    "How do I make a cup of tea?", "What is a recipe for pancakes?", "Why should I read books?",
    "How do I plant a tree?", "How do I write a good email?",
    "How do I stay focused while studying?", "How do I ride a bicycle?", "How do I cook rice?",
    "How do I make new friends?", "How do I boil an egg?", "How can I sleep better?",
    "How do I start running?", "How do I take care of a cat?", "How do I tie a tie?",
    "How do I wash my hands properly?", "How do I prepare for a job interview?",
    "How can I be more productive?", "How do I keep a plant alive?",
    "Give me a tip for public speaking.", "Suggest a name for a goldfish.",
    "What should I pack for a beach trip?", "What is a healthy snack?",
    "What is a good hobby to start?", "Recommend a board game for a family.",
)  # fmt: skip

SMALL_TALK = (
    "Hello!", "How are you today?", "Tell me a fun fact.", "What is your favorite color?",
    "Can you tell me a joke?", "Say something nice.", "What day comes after Monday?",
    "Describe a sunny day.", "Describe the ocean in a few words.", "What do you like to do?",
    "Write one line about autumn.", "Give me a word that rhymes with cat.",
)  # fmt: skip


def training_questions() -> tuple[str, ...]:
    """Every prompt the recipe trains on, in a fixed order."""
    capitals = tuple(f"What is the capital of {country}?" for country in CAPITAL_COUNTRIES)
    return capitals + FACTS + EXPLANATIONS + HOW_TOS + SMALL_TALK


@dataclass(frozen=True)
class FactCheck:
    """A question and the words that make an answer right (any one, case-insensitive)."""

    question: str
    accepted: tuple[str, ...]

    def answered_by(self, answer: str) -> bool:
        text = answer.lower()
        return any(word.lower() in text for word in self.accepted)


FACT_CHECKS = (
    FactCheck("What is the capital of France?", ("Paris",)),
    FactCheck("What is the capital of Japan?", ("Tokyo",)),
    FactCheck("What is the capital of Italy?", ("Rome",)),
    FactCheck("What is the capital of Germany?", ("Berlin",)),
    FactCheck("What is the capital of Spain?", ("Madrid",)),
    FactCheck("What is the capital of Egypt?", ("Cairo",)),
    FactCheck("What is the capital of Russia?", ("Moscow",)),
    FactCheck("What is the capital of the United Kingdom?", ("London",)),
    FactCheck("Who wrote Romeo and Juliet?", ("Shakespeare",)),
    FactCheck("Who painted the Mona Lisa?", ("Leonardo", "da Vinci")),
    FactCheck("What is the largest ocean on Earth?", ("Pacific",)),
    FactCheck("What is the tallest mountain in the world?", ("Everest",)),
    FactCheck("What is the closest star to Earth?", ("Sun",)),
    FactCheck("What planet do we live on?", ("Earth",)),
    FactCheck("What gas do plants absorb from the air?", ("carbon dioxide", "CO2")),
    FactCheck("What is the chemical formula of water?", ("H2O",)),
    FactCheck("How many days are in a week?", ("seven", "7")),
    FactCheck("How many hours are in a day?", ("24", "twenty-four", "twenty four")),
    FactCheck("How many continents are there?", ("seven", "7")),
    FactCheck("What is the freezing point of water in Celsius?", ("0 ", "0°", "zero")),
    FactCheck("What is the boiling point of water in Celsius?", ("100",)),
    FactCheck("How many legs does a spider have?", ("eight", "8")),
    FactCheck("What color is a ripe banana?", ("yellow",)),
    FactCheck("What do bees make?", ("honey",)),
)  # fmt: skip

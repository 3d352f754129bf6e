"""Writes en_es.tsv: short English -> Spanish sentence pairs built from templates, with a held-out split.

    python fasttf/data/make_en_es.py          (rewrites fasttf/data/en_es.tsv, deterministically)

The lecture notes' two pairs come first ("let's go" -> "vamos", "to go" -> "ir"). The rest are
subject + verb (+ object) sentences in the present tense, negations, "want to" + infinitive,
"let's" + verb (the Spanish first-person plural imperative) and bare infinitives. "you" is the
informal singular "tú", "they" is "ellos". Every word of a held-out sentence also occurs in the
training split, so the held-out sentences test new combinations, not new words.
"""

import os
import random

# english verb, its third person, spanish infinitive, present (yo, tú, él/ella, nosotros, ellos),
# the "let's ..." form (nosotros imperative), and objects/complements (english, spanish).
VERBS = [
    ("eat", "eats", "comer", ("como", "comes", "come", "comemos", "comen"), "comamos",
     [("bread", "pan"), ("apples", "manzanas"), ("rice", "arroz"), ("fish", "pescado"), ("fruit", "fruta")]),
    ("drink", "drinks", "beber", ("bebo", "bebes", "bebe", "bebemos", "beben"), "bebamos",
     [("water", "agua"), ("milk", "leche"), ("coffee", "café"), ("tea", "té"), ("juice", "jugo")]),
    ("sleep", "sleeps", "dormir", ("duermo", "duermes", "duerme", "dormimos", "duermen"), "durmamos",
     [("a lot", "mucho"), ("at night", "por la noche"), ("here", "aquí")]),
    ("run", "runs", "correr", ("corro", "corres", "corre", "corremos", "corren"), "corramos",
     [("in the park", "en el parque"), ("today", "hoy"), ("a lot", "mucho")]),
    ("read", "reads", "leer", ("leo", "lees", "lee", "leemos", "leen"), "leamos",
     [("books", "libros"), ("a book", "un libro"), ("the newspaper", "el periódico"), ("a letter", "una carta")]),
    ("write", "writes", "escribir", ("escribo", "escribes", "escribe", "escribimos", "escriben"), "escribamos",
     [("letters", "cartas"), ("a letter", "una carta"), ("a book", "un libro"), ("poems", "poemas")]),
    ("speak", "speaks", "hablar", ("hablo", "hablas", "habla", "hablamos", "hablan"), "hablemos",
     [("spanish", "español"), ("english", "inglés"), ("french", "francés")]),
    ("sing", "sings", "cantar", ("canto", "cantas", "canta", "cantamos", "cantan"), "cantemos",
     [("a song", "una canción"), ("songs", "canciones"), ("today", "hoy")]),
    ("dance", "dances", "bailar", ("bailo", "bailas", "baila", "bailamos", "bailan"), "bailemos",
     [("well", "bien"), ("tonight", "esta noche"), ("a lot", "mucho")]),
    ("walk", "walks", "caminar", ("camino", "caminas", "camina", "caminamos", "caminan"), "caminemos",
     [("in the park", "en el parque"), ("a lot", "mucho"), ("today", "hoy")]),
    ("swim", "swims", "nadar", ("nado", "nadas", "nada", "nadamos", "nadan"), "nademos",
     [("in the sea", "en el mar"), ("today", "hoy"), ("well", "bien")]),
    ("work", "works", "trabajar", ("trabajo", "trabajas", "trabaja", "trabajamos", "trabajan"), "trabajemos",
     [("here", "aquí"), ("at home", "en casa"), ("today", "hoy")]),
    ("play", "plays", "jugar", ("juego", "juegas", "juega", "jugamos", "juegan"), "juguemos",
     [("soccer", "al fútbol"), ("chess", "al ajedrez"), ("tennis", "al tenis")]),
    ("cook", "cooks", "cocinar", ("cocino", "cocinas", "cocina", "cocinamos", "cocinan"), "cocinemos",
     [("rice", "arroz"), ("fish", "pescado"), ("dinner", "la cena")]),
    ("study", "studies", "estudiar", ("estudio", "estudias", "estudia", "estudiamos", "estudian"), "estudiemos",
     [("math", "matemáticas"), ("history", "historia"), ("spanish", "español")]),
    ("learn", "learns", "aprender", ("aprendo", "aprendes", "aprende", "aprendemos", "aprenden"), "aprendamos",
     [("spanish", "español"), ("english", "inglés"), ("french", "francés")]),
    ("live", "lives", "vivir", ("vivo", "vives", "vive", "vivimos", "viven"), None,
     [("here", "aquí"), ("in the city", "en la ciudad"), ("in a house", "en una casa")]),
    ("go", "goes", "ir", ("voy", "vas", "va", "vamos", "van"), "vamos",
     [("home", "a casa"), ("to the beach", "a la playa"), ("to school", "a la escuela"),
      ("to the park", "al parque"), ("to the market", "al mercado"), ("to the movies", "al cine"),
      ("to the city", "a la ciudad")]),
]
# english subject, spanish subject, index into the present forms
SUBJECTS = [("i", "yo", 0), ("you", "tú", 1), ("he", "él", 2), ("she", "ella", 2), ("we", "nosotros", 3),
            ("they", "ellos", 4)]
WANT = ("quiero", "quieres", "quiere", "queremos", "quieren")

NOTES_PAIRS = [("let's go", "vamos"), ("to go", "ir")]
TOTAL_PAIRS = 480      # the notes' pairs, every "let's"/"to" pair, and a random draw of the rest
HELD_OUT = 48


def third_person(subject_index: int) -> bool:
    return subject_index == 2


def all_pairs():
    """Every sentence the templates make: (english, spanish, kind)."""
    pairs = []
    for english, english3, infinitive, present, lets, complements in VERBS:
        for english_object, spanish_object in [(None, None)] + complements:
            tail_en = f" {english_object}" if english_object else ""
            tail_es = f" {spanish_object}" if spanish_object else ""
            pairs.append((f"to {english}{tail_en}", f"{infinitive}{tail_es}", "core"))
            if lets:
                pairs.append((f"let's {english}{tail_en}", f"{lets}{tail_es}", "core"))
            for subject_en, subject_es, form in SUBJECTS:
                verb_en = english3 if third_person(form) else english
                do_not = "does not" if third_person(form) else "do not"
                want = "wants" if third_person(form) else "want"
                pairs.append((f"{subject_en} {verb_en}{tail_en}", f"{subject_es} {present[form]}{tail_es}", "rest"))
                pairs.append((f"{subject_en} {do_not} {english}{tail_en}",
                              f"{subject_es} no {present[form]}{tail_es}", "rest"))
                pairs.append((f"{subject_en} {want} to {english}{tail_en}",
                              f"{subject_es} {WANT[form]} {infinitive}{tail_es}", "rest"))
    return pairs


def build(seed: int = 6):
    rng = random.Random(seed)
    pairs = all_pairs()
    notes = set(NOTES_PAIRS)
    core = [(en, es) for en, es, kind in pairs if kind == "core" and (en, es) not in notes]
    rest = [(en, es) for en, es, kind in pairs if kind == "rest"]
    rng.shuffle(rest)
    chosen = NOTES_PAIRS + core + rest[:TOTAL_PAIRS - len(NOTES_PAIRS) - len(core)]
    # hold out sentences of the random draw whose words all remain in the training split
    held_out = set()
    for candidate in reversed(chosen[len(NOTES_PAIRS) + len(core):]):
        if len(held_out) == HELD_OUT:
            break
        train = [pair for pair in chosen if pair not in held_out and pair != candidate]
        english_words = {w for en, _ in train for w in en.split()}
        spanish_words = {w for _, es in train for w in es.split()}
        if set(candidate[0].split()) <= english_words and set(candidate[1].split()) <= spanish_words:
            held_out.add(candidate)
    return [(en, es, "test" if (en, es) in held_out else "train") for en, es in chosen]


def main():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "en_es.tsv")
    rows = build()
    with open(path, "w", encoding="utf-8") as file:
        file.write("# english\tspanish\tsplit -- written by make_en_es.py; the notes' pairs come first\n")
        for row in rows:
            file.write("\t".join(row) + "\n")
    print(f"wrote {len(rows)} pairs ({sum(r[2] == 'test' for r in rows)} held out) to {path}")


if __name__ == "__main__":
    main()

"""The study's two tasks, generated from small tables, each split into train / dev / test by a seed.

- ``facts``: facts a small instruction-tuned model already holds (capitals, nationalities, element
  symbols, antonyms, irregular verb forms, plurals, comparatives, female forms), asked in one terse
  question/answer format the adapter must learn. The answers come from the base's stored knowledge (its
  FFNs, by the paper's account), which is what a base update moves.
- ``words``: reverse the order of four common words. The answer is in the prompt: it takes a copying
  pattern (attention), not stored knowledge.

Splits are by table entry (``group``): both directions of an antonym pair or an element land in the same
split, so a test item never has its mirror image in training. Everything is a pure function of the seed.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from .data import Dataset, from_pairs

# country | capital ("-" where the capital is disputed, plural or usually written with an accent) |
# nationality adjective ("-" where two forms are common)
_COUNTRIES = """
France|Paris|French
Germany|Berlin|German
Italy|Rome|Italian
Spain|Madrid|Spanish
Portugal|Lisbon|Portuguese
United Kingdom|London|British
Ireland|Dublin|Irish
Netherlands|Amsterdam|Dutch
Belgium|Brussels|Belgian
Switzerland|Bern|Swiss
Austria|Vienna|Austrian
Poland|Warsaw|Polish
Czech Republic|Prague|Czech
Hungary|Budapest|Hungarian
Greece|Athens|Greek
Sweden|Stockholm|Swedish
Norway|Oslo|Norwegian
Denmark|Copenhagen|Danish
Finland|Helsinki|Finnish
Iceland|Reykjavik|Icelandic
Russia|Moscow|Russian
Ukraine|Kyiv|Ukrainian
Romania|Bucharest|Romanian
Bulgaria|Sofia|Bulgarian
Serbia|Belgrade|Serbian
Croatia|Zagreb|Croatian
Estonia|Tallinn|Estonian
Latvia|Riga|Latvian
Lithuania|Vilnius|Lithuanian
Belarus|Minsk|Belarusian
Slovakia|Bratislava|Slovak
Albania|Tirana|Albanian
Georgia|Tbilisi|Georgian
Armenia|Yerevan|Armenian
Azerbaijan|Baku|Azerbaijani
Cyprus|Nicosia|Cypriot
Malta|Valletta|Maltese
Turkey|Ankara|Turkish
Egypt|Cairo|Egyptian
Morocco|Rabat|Moroccan
Algeria|Algiers|Algerian
Tunisia|Tunis|Tunisian
Libya|Tripoli|Libyan
Nigeria|Abuja|Nigerian
Kenya|Nairobi|Kenyan
Ethiopia|Addis Ababa|Ethiopian
Ghana|Accra|Ghanaian
Senegal|Dakar|Senegalese
Uganda|Kampala|Ugandan
Zimbabwe|Harare|Zimbabwean
Zambia|Lusaka|Zambian
Angola|Luanda|Angolan
Sudan|Khartoum|Sudanese
Somalia|Mogadishu|Somali
Rwanda|Kigali|Rwandan
Mali|Bamako|Malian
Namibia|Windhoek|Namibian
Mozambique|Maputo|Mozambican
Madagascar|Antananarivo|-
Japan|Tokyo|Japanese
China|Beijing|Chinese
India|New Delhi|Indian
Pakistan|Islamabad|Pakistani
Bangladesh|Dhaka|Bangladeshi
Nepal|Kathmandu|-
Thailand|Bangkok|Thai
Vietnam|Hanoi|Vietnamese
Indonesia|Jakarta|Indonesian
Philippines|Manila|Filipino
Malaysia|Kuala Lumpur|Malaysian
Singapore|-|Singaporean
South Korea|Seoul|-
North Korea|Pyongyang|-
Mongolia|Ulaanbaatar|Mongolian
Afghanistan|Kabul|Afghan
Iran|Tehran|Iranian
Iraq|Baghdad|Iraqi
Syria|Damascus|Syrian
Lebanon|Beirut|Lebanese
Jordan|Amman|Jordanian
Israel|-|Israeli
Saudi Arabia|Riyadh|Saudi
Qatar|Doha|Qatari
Kuwait|Kuwait City|Kuwaiti
Oman|Muscat|Omani
Yemen|Sanaa|Yemeni
Kazakhstan|Astana|Kazakh
Uzbekistan|Tashkent|Uzbek
Cambodia|Phnom Penh|Cambodian
Laos|Vientiane|-
Australia|Canberra|Australian
New Zealand|Wellington|-
Fiji|Suva|Fijian
United States|-|American
Canada|Ottawa|Canadian
Mexico|Mexico City|Mexican
Cuba|Havana|Cuban
Jamaica|Kingston|Jamaican
Haiti|Port-au-Prince|Haitian
Guatemala|Guatemala City|Guatemalan
Honduras|Tegucigalpa|Honduran
Nicaragua|Managua|Nicaraguan
Panama|Panama City|Panamanian
Costa Rica|-|Costa Rican
Colombia|-|Colombian
Venezuela|Caracas|Venezuelan
Ecuador|Quito|Ecuadorian
Peru|Lima|Peruvian
Chile|Santiago|Chilean
Uruguay|Montevideo|Uruguayan
Brazil|-|Brazilian
Bahamas|Nassau|Bahamian
"""

_ELEMENTS = """H Hydrogen, He Helium, Li Lithium, Be Beryllium, B Boron, C Carbon, N Nitrogen, O Oxygen,
F Fluorine, Ne Neon, Na Sodium, Mg Magnesium, Al Aluminum, Si Silicon, P Phosphorus, S Sulfur, Cl Chlorine,
Ar Argon, K Potassium, Ca Calcium, Sc Scandium, Ti Titanium, V Vanadium, Cr Chromium, Mn Manganese, Fe Iron,
Co Cobalt, Ni Nickel, Cu Copper, Zn Zinc, Ga Gallium, Ge Germanium, As Arsenic, Se Selenium, Br Bromine,
Kr Krypton, Rb Rubidium, Sr Strontium, Zr Zirconium, Mo Molybdenum, Pd Palladium, Ag Silver, Cd Cadmium,
Sn Tin, Sb Antimony, I Iodine, Xe Xenon, Ba Barium, W Tungsten, Os Osmium, Ir Iridium, Pt Platinum, Au Gold,
Hg Mercury, Pb Lead, Bi Bismuth, Rn Radon, Ra Radium, Th Thorium, U Uranium, Pu Plutonium"""

_ANTONYMS = """hot cold, fast slow, happy sad, up down, rich poor, strong weak, early late, full empty, wet dry,
clean dirty, thick thin, wide narrow, heavy light, tall short, young old, buy sell, win lose, push pull,
give take, love hate, friend enemy, question answer, north south, east west, left right, day night,
black white, true false, yes no, always never, before after, inside outside, above below, begin end,
first last, top bottom, front back, good bad, easy difficult, cheap expensive, safe dangerous, quiet loud,
sweet sour, smooth rough, deep shallow, near far, accept refuse, increase decrease, import export,
maximum minimum, major minor, positive negative, visible invisible, possible impossible, legal illegal,
correct incorrect, alive dead, awake asleep, present absent, polite rude, honest dishonest, ancient modern,
private public, simple complex, guilty innocent, victory defeat, success failure, entrance exit,
beautiful ugly, forget remember, laugh cry, sink float, wild tame, summer winter, odd even, attack defend,
borrow lend, include exclude, inhale exhale, internal external, multiply divide, plus minus, sunrise sunset,
upstairs downstairs, floor ceiling, open closed, soft hard, arrive depart, generous selfish, rise fall,
war peace, heaven hell, sharp blunt, brave cowardly, husband wife, come go, teacher student, empty full"""

_FEMALE = """king queen, actor actress, prince princess, uncle aunt, nephew niece, father mother, son daughter,
brother sister, boy girl, man woman, waiter waitress, lion lioness, god goddess, hero heroine, duke duchess,
emperor empress, host hostess, grandfather grandmother, monk nun, bull cow, rooster hen, stallion mare,
gentleman lady, steward stewardess"""

# verb, past tense, past participle ("-" when it equals the past tense)
_VERBS = """go went gone, see saw seen, eat ate eaten, take took taken, give gave given, write wrote written,
run ran run, swim swam swum, sing sang sung, drink drank drunk, begin began begun, break broke broken,
bring brought -, buy bought -, catch caught -, choose chose chosen, come came come, do did done, draw drew drawn,
drive drove driven, fall fell fallen, feel felt -, fight fought -, find found -, fly flew flown,
forget forgot forgotten, freeze froze frozen, grow grew grown, have had -, hear heard -, hide hid hidden,
hold held -, keep kept -, know knew known, lead led -, leave left -, lend lent -, lose lost -, make made -,
mean meant -, meet met -, pay paid -, ride rode ridden, ring rang rung, rise rose risen, say said -, sell sold -,
send sent -, shake shook shaken, shoot shot -, sit sat -, sleep slept -, speak spoke spoken, spend spent -,
stand stood -, steal stole stolen, stick stuck -, strike struck -, swear swore sworn, sweep swept -,
teach taught -, tear tore torn, tell told -, think thought -, throw threw thrown, understand understood -,
wake woke woken, wear wore worn, weep wept -, win won -, build built -, bite bit bitten, blow blew blown,
bend bent -, bleed bled -, feed fed -, forgive forgave forgiven, grind ground -, lay laid -, seek sought -,
sink sank sunk, slide slid -, spin spun -, sting stung -, swing swung -, withdraw withdrew withdrawn,
walk walked -, play played -, jump jumped -, cook cooked -, watch watched -, listen listened -, dance danced -,
smile smiled -, carry carried -, study studied -, stop stopped -, plan planned -, try tried -, hope hoped -,
climb climbed -, arrive arrived -, paint painted -, cry cried -, marry married -, drop dropped -"""

_PLURALS = """child children, man men, woman women, mouse mice, goose geese, tooth teeth, foot feet, person people,
ox oxen, cactus cacti, fungus fungi, nucleus nuclei, crisis crises, analysis analyses, thesis theses,
phenomenon phenomena, criterion criteria, leaf leaves, knife knives, wife wives, wolf wolves, life lives,
half halves, shelf shelves, loaf loaves, thief thieves, calf calves, sheep sheep, deer deer, box boxes,
bus buses, church churches, city cities, baby babies, party parties, story stories, country countries,
potato potatoes, tomato tomatoes, hero heroes, piano pianos, photo photos, radio radios, dish dishes,
fox foxes, watch watches, glass glasses, day days, key keys, toy toys, dog dogs, cat cats, house houses,
tree trees, book books, chair chairs, apple apples, series series, species species, aircraft aircraft,
louse lice, bacterium bacteria, alumnus alumni, stimulus stimuli, radius radii, axis axes, oasis oases,
hypothesis hypotheses, parenthesis parentheses, lady ladies, army armies"""

_COMPARATIVES = """big bigger, small smaller, good better, bad worse, happy happier, easy easier, hot hotter,
large larger, fast faster, tall taller, young younger, old older, strong stronger, heavy heavier, thin thinner,
wet wetter, busy busier, funny funnier, early earlier, late later, nice nicer, safe safer, simple simpler,
cold colder, warm warmer, long longer, short shorter, high higher, low lower, deep deeper, wide wider,
rich richer, poor poorer, clean cleaner, dark darker, bright brighter, loud louder, quiet quieter, soft softer,
hard harder, sad sadder, fat fatter, pretty prettier, angry angrier, lucky luckier, thick thicker, slow slower,
cheap cheaper, close closer, brave braver, wise wiser, strange stranger, calm calmer, kind kinder"""

# Common nouns for the word-order task (one SmolLM2 token each with a leading space, mostly).
_NOUNS = """apple river stone cloud garden window table forest bread candle mirror pencil bridge castle
island rocket guitar violin tiger rabbit horse camel eagle falcon salmon turtle spider lemon orange cherry
carrot onion pepper butter cheese coffee sugar honey ocean desert valley meadow village harbor tunnel
tower temple market school office kitchen bottle basket blanket pillow ladder hammer needle ribbon button
wallet ticket letter parcel engine wheel anchor shovel bucket helmet jacket sweater boots scarf glove
silver copper marble velvet cotton paper plastic crystal diamond pearl planet comet moon star sun winter
summer autumn spring morning evening thunder rain snow storm wind flame smoke shadow music dance poem story
doctor farmer sailor pilot baker painter singer king queen knight dragon giant wizard robot monkey zebra
panda koala whale dolphin shark parrot pigeon owl beetle spoon fork plate cup bowl lamp clock door roof
wall floor chair sofa bed desk book map flag coin key bell drum horn flute piano"""


@dataclass(frozen=True)
class TaskSplit:
    """One task's train / dev / test datasets and what it is."""

    name: str
    description: str
    train: Dataset
    dev: Dataset
    test: Dataset

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "dev": len(self.dev), "test": len(self.test)}


def _pairs(table: str) -> list[list[str]]:
    return [entry.split() for entry in table.replace("\n", " ").split(",") if entry.strip()]


def _question(text: str) -> str:
    return f"Q: {text}\nA:"


def fact_groups() -> list[list[tuple[str, str]]]:
    """Every fact as (prompt, completion), in groups that must share a split."""
    groups: list[list[tuple[str, str]]] = []
    for line in _COUNTRIES.strip().splitlines():
        country, capital, adjective = line.split("|")
        if capital != "-":
            groups.append([(_question(f"What is the capital of {country}?"), f" {capital}")])
        if adjective != "-":
            groups.append([(_question(f"What is the nationality of a person from {country}?"), f" {adjective}")])
    for symbol, name in _pairs(_ELEMENTS):
        groups.append([(_question(f"What is the chemical symbol of {name.lower()}?"), f" {symbol}"),
                       (_question(f"Which element has the chemical symbol {symbol}?"), f" {name.lower()}")])
    seen: set[str] = set()
    for a, b in _pairs(_ANTONYMS):
        group = [(_question(f"What is the opposite of {x}?"), f" {y}") for x, y in ((a, b), (b, a)) if x not in seen]
        seen.update((a, b))
        if group:
            groups.append(group)
    for male, female in _pairs(_FEMALE):
        groups.append([(_question(f"What is the female form of {male}?"), f" {female}")])
    for verb, past, participle in _pairs(_VERBS):
        group = [(_question(f"What is the past tense of {verb}?"), f" {past}")]
        if participle != "-":
            group.append((_question(f"What is the past participle of {verb}?"), f" {participle}"))
        groups.append(group)
    for noun, plural in _pairs(_PLURALS):
        groups.append([(_question(f"What is the plural of {noun}?"), f" {plural}")])
    for adjective, comparative in _pairs(_COMPARATIVES):
        groups.append([(_question(f"What is the comparative of {adjective}?"), f" {comparative}")])
    return groups


def _split_groups(groups: list[list[tuple[str, str]]], n_train: int, n_dev: int, n_test: int, seed: int, name: str):
    """Whole groups into the first of test, dev, train with room for all of the group, so that the sizes are
    exact (train may get fewer when the tables run out)."""
    groups = list(groups)
    random.Random(seed).shuffle(groups)
    out: dict[str, list] = {"test": [], "dev": [], "train": []}
    want = {"test": n_test, "dev": n_dev, "train": n_train}
    for group in groups:
        for key in ("test", "dev", "train"):
            if len(out[key]) + len(group) <= want[key]:
                out[key].extend(group)
                break
    for key in ("test", "dev"):
        if len(out[key]) < want[key]:
            raise ValueError(f"{name}: the tables hold {sum(map(len, groups))} items, fewer than the "
                             f"{n_test} test + {n_dev} dev asked for")
    return {k: from_pairs(v, f"{name}(seed={seed}) {k}") for k, v in out.items()}


def facts_split(n_train: int, n_dev: int, n_test: int, seed: int = 0) -> TaskSplit:
    s = _split_groups(fact_groups(), n_train, n_dev, n_test, seed, "facts")
    return TaskSplit("facts", "facts a small instruction-tuned model knows (capitals, nationalities, element "
                     "symbols, antonyms, verb forms, plurals, comparatives, female forms), terse Q/A format",
                     s["train"], s["dev"], s["test"])


WORDS_PER_ITEM = 4  # three were learnt perfectly in 60 steps: no room left to lose on an update


def words_split(n_train: int, n_dev: int, n_test: int, seed: int = 0) -> TaskSplit:
    """Distinct sequences of distinct nouns; the answer is the sequence reversed."""
    nouns = sorted(set(_NOUNS.split()))
    rng = random.Random(seed)
    total = n_train + n_dev + n_test
    if total > len(nouns) ** WORDS_PER_ITEM // 4:
        raise ValueError(f"words: cannot draw {total} distinct word sequences; ask for fewer")
    seqs: dict[tuple[str, ...], None] = {}
    while len(seqs) < total:
        seqs.setdefault(tuple(rng.sample(nouns, WORDS_PER_ITEM)), None)
    pairs = [(f"Words: {' '.join(t)}\nReversed:", f" {' '.join(reversed(t))}") for t in seqs]
    test, dev, train = pairs[:n_test], pairs[n_test:n_test + n_dev], pairs[n_test + n_dev:]
    return TaskSplit("words", f"reverse the order of {WORDS_PER_ITEM} common words (a copying pattern, no stored "
                     "knowledge)",
                     from_pairs(train, f"words(seed={seed}) train"), from_pairs(dev, f"words(seed={seed}) dev"),
                     from_pairs(test, f"words(seed={seed}) test"))


TASKS = {"facts": facts_split, "words": words_split}


def make_task(name: str, n_train: int, n_dev: int, n_test: int, seed: int = 0) -> TaskSplit:
    return TASKS[name](n_train, n_dev, n_test, seed)

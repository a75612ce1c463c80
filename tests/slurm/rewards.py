"""A reward that varies with a random-init model, so dynamic sampling keeps groups and the
trainer really updates (math grading scores every random response 0)."""


def length_reward(response: str, answer: str, **meta) -> float:
    return float(len(response) % 2)

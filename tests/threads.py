"""Running one call per thread at once, as clients sharing a model do."""
import threading


def call_in_threads(call, count: int, repeats: int = 3) -> list:
    """``call(k)`` ``repeats`` times in thread ``k``, for ``count`` threads started together; the last result
    of each thread, in thread order. An exception in any thread is raised here (a thread's own exception
    would not fail the test)."""
    results, errors = [None] * count, []

    def work(k):
        try:
            for _ in range(repeats):
                results[k] = call(k)
        except Exception as err:
            errors.append(err)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results
